"""What the joint methods (ETEGRec, UniGRec) share: history samples over live codes, code regeneration,
their pipeline stages (SASRec teacher, RQ-VAE pre-training), evaluation and loading on the trained codes."""
