"""Preference data: files -> packed, sharded, resumable batches (grain).

| module | concept |
|---|---|
| ``config`` | every data key with its default (``config.data``) |
| ``readers`` | JSONL / JSON / Parquet / ``save_to_disk`` files -> raw records |
| ``formats`` | raw records (TRL, HH-RLHF, UltraFeedback, Capybara, ranked) -> prompt + responses |
| ``tokenizers`` | byte-level and local Hugging Face tokenizers; the prompt/response boundary |
| ``examples`` | one record -> a ``layout.Example`` (tokenize, truncate, fit) or a skip reason |
| ``accounting`` | skip reasons, ``DataError``, the summary (read = used + skipped) |
| ``packing`` | grain transform: bounded-buffer packing into ``layout.build_batch`` batches |
| ``pipeline`` | ``make_batch_iterator``, ``make_tokenizer``, ``load_summary`` |
"""
