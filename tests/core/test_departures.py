"""docs/departures.md lists exactly the keys params/toy.yaml departs in, with the values both files hold."""
import json
import re

import yaml

from fmalib.core import config as C
from fmalib.core.params import load_params, repo_root

# the toy's identity, not departures from the method's settings
IDENTITY = ("name", "workdir", "data.", "classes.", "clip.", "sam.", "sam2.", "foundation.", "paper_settings",
            "fast", "variants")


def _shown(value) -> str:
    return json.dumps(value).replace('"', "") if not isinstance(value, str) else value


def test_departures_table_matches_the_params():
    toy, defaults = load_params("params/toy.yaml"), {d: C.default_of(f) for d, _, f in C.leaves()}
    departed = {d for d, v in defaults.items() if not d.startswith(IDENTITY) and toy.get_dotted(d) != v}
    rows = re.findall(r"^\| `([\w.]+)`( †)? \| (.*?) \| (.*?) \| (.*?) \| (.*?) \|$",
                      (repo_root() / "docs/departures.md").read_text(), re.M)
    assert {r[0] for r in rows} == departed
    for key, dagger, toy_cell, paper_cell, why, _ in rows:
        assert toy_cell == _shown(toy.get_dotted(key)), key
        assert paper_cell == _shown(defaults[key]), key
        assert why, key
        assert bool(dagger) == (key in toy.paper_settings), key
    stated = yaml.safe_load((repo_root() / "params/toy.yaml").read_text())
    assert stated["paper_settings"] == {k: defaults[k] for k in toy.paper_settings}
