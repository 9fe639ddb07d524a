"""Format registry: names round-trip, overrides, helpful errors."""

import pytest

from jquant.formats import FORMATS, IntFormat, get_format


def test_every_name_builds_the_format_of_that_name():
    for name, factory in FORMATS.items():
        fmt = factory()
        assert fmt.name == name and get_format(name) == fmt and str(fmt) == name
    for name in ("int8", "int4", "int4-g128", "int3-g128", "int2-g64", "fp8-e4m3", "fp8-e5m2", "nvfp4",
                 "mxfp4", "mxfp6-e2m3", "mxfp6-e3m2", "mxfp8-e4m3", "mxfp8-e5m2", "gse-int8"):
        assert name in FORMATS


def test_overrides_and_other_group_sizes():
    assert get_format("int4-g128", clip_search=True).name == "int4-g128-mse"
    assert get_format("int4-g16") == IntFormat(bits=4, group_size=16)
    assert get_format("int3-g48-asym").symmetric is False
    fmt = get_format("gse-int8")
    assert get_format(fmt, group_size=64).name == "gse-int8-g64"


def test_errors_list_the_valid_names():
    with pytest.raises(ValueError, match=r"Unknown format 'int4-g12B'\. Did you mean 'int4-g128'") as e:
        get_format("int4-g12B")
    assert "mxfp4" in str(e.value) and "nvfp4" in str(e.value)
    with pytest.raises(TypeError, match="bad override"):
        get_format("int4", nbits=3)
    with pytest.raises(ValueError, match="bits=7"):
        get_format("int7-g64")
