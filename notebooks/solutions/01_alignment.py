"""Solutions of chapter 1's exercises (tests/test_solutions.py fills them into the notebook)."""

# %% EXERCISE: prompt_wrap
def my_prompt_ids(tokenizer, prompt, n_image_tokens):
    """[BOS] segment_0 [image] segment_1 [image] ... with -1 for every image slot."""
    ids = [tokenizer.bos_token_id]  # BOS once, before the first segment
    for i, segment in enumerate(prompt.split("<ImageHere>")):
        if i > 0:  # an <ImageHere> stood between segment i-1 and segment i
            ids += [-1] * n_image_tokens
        ids += tokenizer(segment, add_special_tokens=False).input_ids
    return ids

# %% EXERCISE: label_mask
def my_build_example(tokenizer, prompt, answer, n_image_tokens, end_sym, max_txt_len):
    """(ids, labels): the prompt wrap, then the answer; only the answer's tokens carry a loss."""
    ids = my_prompt_ids(tokenizer, prompt if prompt is not None else "<ImageHere>",
                        n_image_tokens)
    labels = [-100] * len(ids)
    if answer is not None:
        target = tokenizer(answer + end_sym, add_special_tokens=False).input_ids[:max_txt_len]
        ids, labels = ids + target, labels + target
    return ids, labels

# %% EXERCISE: embed
def my_embed(model, input_ids, image_mask, image_embeds):
    """Word embeddings of the text, and the visual tokens in the image slots, in order."""
    inputs = model.llm.get_input_embeddings()(input_ids).clone()
    inputs[image_mask] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(inputs.dtype)
    return inputs

# %% EXERCISE: projection_params
def my_projection_params(q_hidden, d_llm, projection):
    """Weights + biases of llama_proj: one Linear, or the 3-layer MLP of Table 5."""
    if projection == "linear":
        return q_hidden * d_llm + d_llm
    return (q_hidden * d_llm + d_llm) + 2 * (d_llm * d_llm + d_llm)
