# This drafter has a trimmed vocabulary (4096-row lm_head + draft_to_target.json). transformers and vLLM need a
# full-vocabulary head, so export an equivalent drafter first (it proposes the same greedy drafts):
#   sd2 publish artifacts/smollm2-sd2/10_trim.finetune --repo-id you/drafter --dry-run --out artifacts/smollm2-sd2/10_trim.finetune-fullvocab
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained('/root/.cache/sd2/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f')
target = AutoModelForCausalLM.from_pretrained('/root/.cache/sd2/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f')
drafter = AutoModelForCausalLM.from_pretrained('artifacts/smollm2-sd2/10_trim.finetune-fullvocab')
ids = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
                              return_dict=True, return_tensors="pt")
out = target.generate(**ids, assistant_model=drafter, num_assistant_tokens=2,
                      num_assistant_tokens_schedule="constant", do_sample=False, max_new_tokens=256)
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
