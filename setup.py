"""Packaging beyond pyproject.toml: which packages the wheel holds.

Every package under src/ (found, so a new subpackage cannot be forgotten) and the Hydra plugin package
hydra_plugins.headstart_launcher (in the hydra_plugins namespace, which find_packages does not see). conf/ at the
repository root is copied into the built package as headstart/conf/, where headstart.cli finds it in an installed
wheel (in a clone it reads conf/).

Why a copy and not `package_dir={"headstart.conf": "conf"}`: with only src/ mapped, setuptools' editable install
(`pip install -e .`) is a plain path entry for src/, and Hydra 1.3 finds the launcher plugin by listing the
hydra_plugins namespace's folders, which the import hooks of a mapped editable install hide.
"""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildWithConf(build_py):
    """build_py, plus conf/**/*.yaml as headstart/conf/ in the build."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for source in sorted(CONF.rglob("*.yaml")):
            target = Path(self.build_lib, "headstart", "conf", source.relative_to(CONF))
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target))


setup(
    packages=[*find_packages("src"), "hydra_plugins.headstart_launcher"],
    package_dir={"": "src"},
    cmdclass={"build_py": BuildWithConf},
)
