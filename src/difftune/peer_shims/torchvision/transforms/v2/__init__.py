"""Present because transformers imports it when torchvision is installed; the scripts use none of it."""
