"""trainer: compact traces in, a vLLM-loadable EAGLE-3 drafter out, no activation store anywhere.

| module              | what it is                                                                      |
|---------------------|---------------------------------------------------------------------------------|
| trace_window.py     | Delta window reader (time, versions, target, held-out split), labels, packs      |
| target_features.py  | frozen HF target forward -> aux hidden states, embeddings, log-probs, argmax     |
| eagle3_drafter.py   | the EAGLE-3 head, TTT unroll (flash attention per document), vLLM format, d2t   |
| unroll_batch.py     | one packed TTT batch: targets, masks, rejected proposals, RL rollouts            |
| losses.py           | pure losses + mixer: KL, acceptance per verification rule, RL, anchor, discard   |
| drafter_store.py    | served drafter weights by version (for the discard term)                        |
| train_loop.py       | the recipe: setup/train/cleanup, AdamW, checkpoints, MLflow, torchrun/DDP        |
| replay_eval.py      | offline replay tau per domain (greedy chain drafting against the target)        |
| recipes.py          | pydantic recipe schema + YAML loading with dotted overrides (recipes/*.yaml)     |
| cli.py              | `flywheel train`, `flywheel replay-eval`                                        |
"""
