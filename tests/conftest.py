import torch

# Training uses one torch thread (Config.torch_threads); tests do the same, which is much
# faster for these small networks and keeps results independent of the machine's cores.
torch.set_num_threads(1)
