"""Packaging for cluster_glip. Every setting lives in `settings.ini`; edit it there, not here."""
import shlex, shutil
from configparser import ConfigParser
from pathlib import Path

import setuptools
from setuptools.command.build_py import build_py

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

cfg_keys = 'version description keywords author author_email'.split()
expected = cfg_keys + 'lib_name user branch license status min_python audience language'.split()
for key in expected: assert key in cfg, f'missing expected setting: {key}'
setup_cfg = {key: cfg[key] for key in cfg_keys}

licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive']
py_versions = '3.10 3.11 3.12 3.13'.split()

requirements = shlex.split(cfg.get('requirements', ''))
if cfg.get('pip_requirements'): requirements += shlex.split(cfg.get('pip_requirements', ''))
dev_requirements = shlex.split(cfg.get('dev_requirements', ''))
min_python = cfg['min_python']
lic = licenses.get(cfg['license'].lower(), (cfg['license'], None))

# The pre-training notebook the sweep runner executes has one source, nbs/experiments/pretrain.ipynb (it is also a docs
# page); a built package (wheel) carries a copy as cluster_glip/experiments/pretrain.ipynb, so `cluster_glip sweep`
# works from a normal install. An editable install runs the checkout's notebook and needs no copy.
EXPERIMENT_NOTEBOOKS = {'nbs/experiments/pretrain.ipynb': 'experiments/pretrain.ipynb'}

class BuildPyWithNotebooks(build_py):
    "build_py, then the experiment notebooks copied into the built package."
    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False): return
        for source, target in EXPERIMENT_NOTEBOOKS.items():
            path = Path(self.build_lib)/cfg['lib_path']/target
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, path)

setuptools.setup(
    name=cfg['lib_name'],
    license=lic[0],
    classifiers=['Development Status :: ' + statuses[int(cfg['status'])],
                 'Intended Audience :: ' + cfg['audience'].title(),
                 'Natural Language :: ' + cfg['language'].title()]
                + [f'Programming Language :: Python :: {v}' for v in py_versions[py_versions.index(min_python):]]
                + ([f'License :: {lic[1]}'] if lic[1] else []),
    url=cfg['git_url'],
    packages=setuptools.find_packages(include=[cfg['lib_path'], cfg['lib_path'] + '.*']),
    include_package_data=True,
    package_data={cfg['lib_path']: ['*.json', '*.yaml', 'configs/*.yaml', 'configs/*/*.yaml', 'model_configs/*.json']},
    install_requires=requirements,
    extras_require={'dev': dev_requirements},
    python_requires='>=' + min_python,
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    zip_safe=False,
    cmdclass={'build_py': BuildPyWithNotebooks},
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(),
                  'nbdev': [f'{cfg.get("lib_path")}={cfg.get("lib_path")}._modidx:d']},
    **setup_cfg)
