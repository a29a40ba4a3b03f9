"""An embedding and an output layer sharing one weight."""

import torch
from torch import nn

VOCAB, DIM = 20, 8


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.act = nn.Tanh()
        self.out = nn.Linear(DIM, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(self.act(self.mix(self.embed(tokens))))


torch.manual_seed(0)
torch.set_num_threads(1)
model = TiedLM()
print("tied:", model.out.weight is model.embed.weight)
print("parameters:", [name for name, _ in model.named_parameters()])
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
tokens = torch.randint(0, VOCAB, (16, 6))
for step in range(5):
    opt.zero_grad()
    logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.5f}")
print("still tied:", model.out.weight is model.embed.weight)
