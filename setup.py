"""Build hook for the optional C extensions; metadata is in pyproject.toml.

testbed/hw/_fastexit.c (the exit hook) and testbed/hw/_nativemmu.c (the page walk and TLB fill)
are optional=True: if one cannot be compiled the install still succeeds and the hardware model
takes the same path through ctypes and Python (testbed/hw/unicorn_binding.py). So is
testbed/tracker/_native.c (the trackers in C, testbed/tracker/native.py): without it the
"native-*" tracker kinds are simply not offered.

The egg-info goes under build/, not the checkout's root: `python -m pytest` puts the root on
sys.path, where pytest would find testbed.egg-info as the distribution of a pytest11 plugin and
mark every module its SOURCES.txt lists for assertion rewriting - the whole library recompiled
from source in each xdist worker, for nothing (the installed distribution's metadata is in
site-packages either way).
"""

import os

from setuptools import Extension, setup

os.makedirs("build", exist_ok=True)  # egg_info wants its base to exist

setup(options={"egg_info": {"egg_base": "build"}}, ext_modules=[
    Extension("testbed.hw._fastexit", ["testbed/hw/_fastexit.c"], optional=True),
    Extension("testbed.hw._nativemmu", ["testbed/hw/_nativemmu.c"], optional=True),
    Extension("testbed.tracker._native", ["testbed/tracker/_native.c"], optional=True),
])
