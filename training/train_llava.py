"""`deepspeed training/train_llava.py ...`: the LLaVA recipe, `mmfast.training.llava` (or `mmfast train llava`)."""
import sys

from mmfast.training.llava import main

sys.exit(main())
