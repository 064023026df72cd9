"""`deepspeed training/train_clip.py ...`: the CLIP recipe, `mmfast.training.clip` (or `mmfast train clip`)."""
import sys

from mmfast.training.clip import main

sys.exit(main())
