"""Classic nbdev 2 setup: everything is read from settings.ini."""
from configparser import ConfigParser
from pathlib import Path

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read(Path(__file__).with_name("settings.ini"))
cfg = cfg["DEFAULT"]

requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()
fid_requirements = cfg.get("fid_requirements", "").split()
hub_requirements = cfg.get("hub_requirements", "").split()
logger_requirements = cfg.get("logger_requirements", "").split()
peers_requirements = cfg.get("peers_requirements", "").split()
licenses = {"apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License")}
lic = licenses[cfg["license"]]

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg.get("author_email") or None,
    license=lic[0],
    keywords=cfg["keywords"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "License :: " + lic[1],
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=" + cfg["min_python"],
    packages=setuptools.find_packages(include=["mopoe", "mopoe.*"]),
    include_package_data=True,
    install_requires=requirements,
    extras_require={"fid": fid_requirements, "hub": hub_requirements, "loggers": logger_requirements,
                    "peers": peers_requirements,
                    "dev": dev_requirements + fid_requirements + hub_requirements + logger_requirements
                    + peers_requirements},
    entry_points={
        "console_scripts": cfg.get("console_scripts", "").split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    zip_safe=False,
)
