"""Build hook for the one optional C extension (testbed/hw/_fastexit.c); metadata is in pyproject.toml.

optional=True: if it cannot be compiled the install still succeeds and the hardware model
takes the same exit path through ctypes (testbed/hw/cpu.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("testbed.hw._fastexit", ["testbed/hw/_fastexit.c"], optional=True)])
