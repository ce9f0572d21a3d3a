"""cnncodes' pipelines: the CLI and everything built on cached CNN codes.

Rooms, one per capability:

- :mod:`.probes`: reading codes, linear probes (scikit-learn and the batched solver),
  LogME, saved models, ``evaluate`` and ``predict``;
- :mod:`.sweep`: depth vs accuracy over layers and backbones, with its report;
- :mod:`.finetune`: staged fine-tuning, its data, freezing rules, checkpoints and report;
- :mod:`.compare`: probe vs fine-tuning vs scratch on the same test images;
- :mod:`.reports` (shared report pieces), :mod:`.records` (resumable results),
  :mod:`.demo`, :mod:`.sample_data` and :mod:`.cli`.
"""
