"""``sparseft finetune``: the package's methods end to end on SmolLM2-135M-Instruct, offline --
generated arithmetic word problems, accuracy, forgetting on general text, LiNeS post hoc."""
