import datasets


def test_tiny_data_prep_writes_splits(tiny_data, tiny_prism):
    examples = datasets.load_from_disk(str(tiny_data))
    assert set(examples) == {"train", "validation", "test"}
    assert len(examples["train"]) > 100
    prism = datasets.load_from_disk(str(tiny_prism))
    assert set(prism) == {"test"} and len(prism["test"]) > 40
