"""Maps the repository folders to the `textgen.*` import packages.

core/ -> textgen.core, api/ -> textgen.api, backends/ -> textgen.backends, demo/ -> textgen.demo, testing/ -> textgen.testing.
Sub-packages are found automatically so new modules need no edit here.
"""
from setuptools import find_packages, setup

ROOTS = ("core", "api", "backends", "demo", "testing")


def _packages() -> tuple[list[str], dict[str, str]]:
    packages, package_dir = [], {}
    for root in ROOTS:
        package_dir[f"textgen.{root}"] = root
        packages.append(f"textgen.{root}")
        packages += [f"textgen.{root}.{sub}" for sub in find_packages(root)]
    return packages, package_dir


packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir)
