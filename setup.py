"""Packaging beyond pyproject.toml: which packages the wheel holds.

Every package under src/ (found, so a new subpackage cannot be forgotten), plus conf/ at the repository root shipped
as the package headstart.conf, where headstart.cli finds it in an installed wheel (in a clone it reads conf/).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages("src"), "headstart.conf"],
    package_dir={"": "src", "headstart.conf": "conf"},
)
