"""Policy: model + tokenizer loading (built-in tiny model or a local HF folder) in
`npo.policy.model`, the process's compute settings in `npo.policy.compute`.

Nothing is imported here: `npo.policy.compute` needs torch only, and importing the package
must not pull in transformers' model classes (`npo.policy.model`) with it.
"""
