# This drafter has a trimmed vocabulary (4096-row lm_head + draft_to_target.json). transformers and vLLM need a
# full-vocabulary head, so export an equivalent drafter first (it proposes the same greedy drafts):
#   sd2 publish artifacts/smollm2-sd2/10_trim.finetune --repo-id you/drafter --dry-run --out artifacts/smollm2-sd2/10_trim.finetune-fullvocab
from vllm import LLM, SamplingParams

llm = LLM(model='/root/.cache/sd2/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f',
          speculative_config={"method": "draft_model", "model": 'artifacts/smollm2-sd2/10_trim.finetune-fullvocab',
                              "num_speculative_tokens": 2})
out = llm.generate(["Hello!"], SamplingParams(temperature=0.0, max_tokens=256))
print(out[0].outputs[0].text)
