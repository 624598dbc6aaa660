"""SAM's prompted prediction from a cached image embedding, as `SamPredictor.predict` computes it
(prompts in the original image's pixels, moved to SAM's frame by `ResizeLongestSide`), plus
PerSAM's two changes to the mask decoder (ZrrSkywalker/Personalize-SAM per_segment_anything):

- target-guided attention: in each two-way block, the tokens-to-image attention's softmax map
  gets `attn_sim` (the sigmoid of the standardised similarity, [1, 1, 1, h·w]) added and is
  normalised again by a second softmax;
- target-semantic prompting: the target embedding [1, 1, 256] is added to the tokens before
  each block and to the final attention's queries. Its first addition is in place on the prompt
  tokens (`queries = point_embedding; queries += target`), so the tokens' positional term carries
  it from there on, as in the official code.

Everything else is segment_anything's own modules and weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _attention(module, q, k, v, attn_sim=None):
    """segment_anything's Attention.forward, with PerSAM's guidance when `attn_sim` is given."""
    q = module._separate_heads(module.q_proj(q), module.num_heads)
    k = module._separate_heads(module.k_proj(k), module.num_heads)
    v = module._separate_heads(module.v_proj(v), module.num_heads)
    attn = q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    attn = torch.softmax(attn, dim=-1)
    if attn_sim is not None:
        attn = torch.softmax(attn + attn_sim, dim=-1)
    return module.out_proj(module._recombine_heads(attn @ v))


def _block(layer, queries, keys, query_pe, key_pe, attn_sim):
    """TwoWayAttentionBlock.forward with the guided tokens-to-image attention."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = layer.norm2(
        queries + _attention(layer.cross_attn_token_to_image, q, k, keys, attn_sim)
    )
    queries = layer.norm3(queries + layer.mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = layer.norm4(keys + layer.cross_attn_image_to_token(q=k, k=q, v=queries))
    return queries, keys


def _transformer(transformer, src, pos_src, tokens, attn_sim, target):
    """TwoWayTransformer.forward with PerSAM's guidance (see the module docstring)."""
    keys = src.flatten(2).permute(0, 2, 1)
    key_pe = pos_src.flatten(2).permute(0, 2, 1)
    point_embedding = tokens
    queries = point_embedding
    for index, layer in enumerate(transformer.layers):
        if target is not None:
            if index == 0:
                queries = point_embedding = point_embedding + target  # the in-place first add
            else:
                queries = queries + target
        queries, keys = _block(layer, queries, keys, point_embedding, key_pe, attn_sim)
    q = queries + point_embedding
    if target is not None:
        q = q + target
    k = keys + key_pe
    queries = queries + transformer.final_attn_token_to_image(q=q, k=k, v=keys)
    return transformer.norm_final_attn(queries), keys


def decode(sam, embedding, sparse, dense, multimask: bool, attn_sim=None, target=None):
    """MaskDecoder.forward (predict_masks, then the mask slice) on one image's embedding."""
    decoder = sam.mask_decoder
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse), dim=1)
    src = torch.repeat_interleave(embedding, tokens.shape[0], dim=0) + dense
    pos_src = torch.repeat_interleave(sam.prompt_encoder.get_dense_pe(), tokens.shape[0], dim=0)
    b, c, h, w = src.shape
    hs, src = _transformer(decoder.transformer, src, pos_src, tokens, attn_sim, target)
    src = src.transpose(1, 2).view(b, c, h, w)
    upscaled = decoder.output_upscaling(src)
    hyper_in = torch.stack(
        [mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou = decoder.iou_prediction_head(hs[:, 0, :])
    chosen = slice(1, None) if multimask else slice(0, 1)
    return masks[:, chosen], iou[:, chosen]


def prompted_logits(sam, embedding, size, coords, labels, multimask: bool):
    """SamPredictor.predict_torch (segment_anything's own decoder) for point prompts already in
    SAM's frame, `return_logits=True`: logits at the S×S image's `size` and predicted IoUs."""
    from segment_anything.utils.transforms import ResizeLongestSide

    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    low_res, iou = sam.mask_decoder(
        image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )  # fmt: skip
    input_size = ResizeLongestSide.get_preprocess_shape(
        size[0], size[1], sam.image_encoder.img_size
    )
    return sam.postprocess_masks(low_res, input_size, size), iou, low_res


def predict(sam, embedding, size, points=None, labels=None, box=None, mask_input=None,
            multimask=True, attn_sim=None, target=None):  # fmt: skip
    """SamPredictor.predict on an S×S image (`size` = (S, S)) whose embedding is given: the
    masks (thresholded), scores, low-resolution logits and the logits at the image's size."""
    from segment_anything.utils.transforms import ResizeLongestSide

    side = sam.image_encoder.img_size
    transform = ResizeLongestSide(side)
    device = embedding.device
    coords = None
    if points is not None:
        moved = transform.apply_coords(np.asarray(points), size)
        coords = (
            torch.as_tensor(moved, dtype=torch.float, device=device)[None],
            torch.as_tensor(labels, dtype=torch.int, device=device)[None],
        )
    boxes = None
    if box is not None:
        boxes = torch.as_tensor(transform.apply_boxes(box, size), dtype=torch.float, device=device)
        boxes = boxes[None]
    if mask_input is not None:
        mask_input = torch.as_tensor(mask_input, dtype=torch.float, device=device)[None]
    sparse, dense = sam.prompt_encoder(points=coords, boxes=boxes, masks=mask_input)
    low_res, iou = decode(sam, embedding, sparse, dense, multimask, attn_sim, target)
    input_size = transform.get_preprocess_shape(size[0], size[1], side)
    high = sam.postprocess_masks(low_res, input_size, size)
    return high[0] > sam.mask_threshold, iou[0], low_res[0], high[0]
