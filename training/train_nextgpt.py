"""`deepspeed training/train_nextgpt.py ...`: the NExT-GPT recipe, `mmfast.training.nextgpt` (or `mmfast train nextgpt`)."""
import sys

from mmfast.training.nextgpt import main

sys.exit(main())
