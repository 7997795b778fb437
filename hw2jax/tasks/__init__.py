"""The experiments the shared training loop runs: ViT on FashionMNIST, BERT + BiGRU on IMDB."""
