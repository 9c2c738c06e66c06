"""The test run checks tracelens' annotations at run time (jaxtyping's import hook + beartype, pyproject)."""

import jaxtyping
import pytest
import torch

from tracelens.math import projection


def test_a_wrong_shape_fails_the_annotation_check_in_the_test_run():
    with pytest.raises(jaxtyping.TypeCheckError, match="parameter 'vector'"):
        projection(torch.ones(2, 3), torch.ones(4))


def test_an_int_passes_where_a_float_is_annotated():
    from tracelens.metrics import pearson_correlation

    assert pearson_correlation([1, 2, 3], [2, 4, 7]) > 0.9


@pytest.mark.unchecked_types
def test_unchecked_tests_see_tracelens_own_error_message():
    with pytest.raises(ValueError, match="width 3 but the vector has width 4"):
        projection(torch.ones(2, 3), torch.ones(4))
