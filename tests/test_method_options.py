"""CANet's and UGPCL's ``method:`` values are checked when the recipe is loaded
(``medvol.training.load_recipe``, before ``--nproc`` spawns processes): one line naming the
recipe file and the key. The good defaults and every built-in recipe still load."""

from __future__ import annotations

import pytest

from medvol.config import find_recipe
from medvol.errors import ConfigError
from medvol.training import load_recipe

BAD = [
    ("canet_demo", "method.beta=-0.1", "method.beta"),
    ("canet_demo", "method.adv_weight=.nan", "method.adv_weight"),
    ("canet_demo", "method.adv_ramp_div=0", "method.adv_ramp_div"),
    ("canet_demo", "method.adv_ramp_len=1.5", "method.adv_ramp_len"),
    ("canet_demo", "method.d_lr=0", "method.d_lr"),
    ("canet_demo", "method.d_betas=[0.9]", "method.d_betas"),
    ("canet_demo", "method.d_betas=[0.9,1.0]", "method.d_betas"),
    ("canet_demo", "method.d_base=0", "method.d_base"),
    ("canet_demo", "method.foreground=[0]", "method.foreground"),
    ("canet_demo", "method.foreground=[]", "method.foreground"),
    ("ugpcl_demo", "method.temperature=0", "method.temperature"),
    ("ugpcl_demo", "method.consistency=-1", "method.consistency"),
    ("ugpcl_demo", "method.max_anchors_per_class=0", "method.max_anchors_per_class"),
    ("ugpcl_demo", "method.consistency_rampup=0", "method.consistency_rampup"),
    ("ugpcl_demo", "method.anchor_sampling=hardest", "method.anchor_sampling"),
    ("ugpcl_demo", "method.background_queue=ones", "method.background_queue"),
    ("ugpcl_demo", "method.dice=squared", "method.dice"),
]


@pytest.mark.parametrize("recipe,override,key", BAD, ids=[b[1] for b in BAD])
def test_a_bad_method_value_is_refused_at_load(recipe, override, key):
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe, [override])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(find_recipe(recipe))), msg
    assert key in msg and ("must be" in msg or "expected" in msg), msg


@pytest.mark.parametrize("recipe", ["canet_demo", "canet_la", "ugpcl_demo", "ugpcl"])
def test_the_published_and_demo_values_load(recipe):
    load_recipe(recipe, [])
