"""The jobs behind the CLI and recipes, one module per concern.

| module | jobs |
|---|---|
| `info` | `model_info`: family, size and structure of a model directory |
| `conditioning` | what a model is conditioned on: text encoder, VAE decoder, sampling and training conditions |
| `sampling` | `sample_model`: a seeded sample grid |
| `training` | `new_model`, `train_model`, `finetune_model` |
| `compression` | `compress_model`: any registered engine on a saved model |
| `evaluation` | `evaluate_model`, `eval_table`, `compare_models` |
| `recipes` | `run_recipe`: the steps of a recipe, dispatched by kind |

Each job takes plain arguments (paths, the settings dataclasses of `slimdiff.settings`), does its work through
the library modules and returns a result; printing and argument parsing stay in `cli.py`.
"""
