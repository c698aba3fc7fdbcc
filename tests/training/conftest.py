"""The FSDP tests' one spawn of 2 gloo ranks (tests/training/fsdp_ranks.py), shared by test_fsdp.py and
test_fsdp_families.py."""

import pytest
import torch
from fsdp_ranks import MAX_SEQUENCE_LENGTH, WORLD, family_config, flux_config, free_port, run_ranks

from raydiff.config import to_dict


@pytest.fixture(scope="session")
def fsdp_run(tiny_model, shapes, tmp_path_factory) -> str:
    """The directory the ranks wrote their results to."""
    out = str(tmp_path_factory.mktemp("fsdp"))
    families = {family: to_dict(family_config(family, tiny_model(family)))
                for family in MAX_SEQUENCE_LENGTH}
    torch.multiprocessing.spawn(run_ranks, args=(free_port(), to_dict(flux_config(tiny_model("flux"), shapes)),
                                                 families, out), nprocs=WORLD)
    return out
