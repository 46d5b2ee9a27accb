"""What the pipeline's own page shows: the scalars the steps report for it (`pipelines.steps`)
and the controller monitors (`pipelines.dag`), all under one title."""

RESULTS = "results"
TEST_ACCURACY = "test accuracy @ training size"
HIGHRES_ACCURACY = {  # highres's result key -> series
    "test_accuracy_bicubic": "test accuracy @ high res, bicubic",
    "test_accuracy_finetuned": "test accuracy @ high res, fine-tuned",
}


def speedup_series(impl: str) -> str:
    """The series of the best speed-up of an attention implementation over separate Q/K/V."""
    return f"best speed-up of {impl} over separate QKV"
