"""Packaging beyond pyproject.toml: which packages the wheel holds.

Every package under src/ (found, so a new subpackage cannot be forgotten), the Hydra plugin package
hydra_plugins.headstart_launcher (in the hydra_plugins namespace, which find_packages does not see), plus conf/ at the repository root shipped
as the package headstart.conf, where headstart.cli finds it in an installed wheel (in a clone it reads conf/).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages("src"), "hydra_plugins.headstart_launcher", "headstart.conf"],
    package_dir={"": "src", "headstart.conf": "conf"},
)
