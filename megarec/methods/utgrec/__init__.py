"""UTGRec (Zheng et al.): the universal multimodal tokenizer (content encoder, tree codebooks, text and image
decoders; ``tokenizer_*``, ``batches``) and the transfer pipeline of its recommender (``plugin``, ``stages``)."""
