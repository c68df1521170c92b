"""Fine-tune a pretrained image classifier on shifted target data with surgical fine-tuning, and save the adapter.

With no arguments, runs the paper's headline experiment at small scale, offline (a few minutes on a CPU): a small
ResNet pretrained on clean digits, a contrast-shifted target, and target accuracy per tuned block, printed and
charted (see `surgical_peft.experiments.demo`).

With arguments, runs one fine-tuning, on one CPU or, under `accelerate launch`, on several devices:

    python examples/train.py --block stage1 --shift fog --train-n 200 --epochs 10
    python examples/train.py --model ./my_model --dataset ./my_images --dry-run
    python examples/train.py --model microsoft/resnet-18 --dataset ./my_images --new-head --block stage1
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/train.py --block stage1
    python examples/train.py --block stage1 --push-to-hub --hub-model-id me/resnet-stage1-fog

The options are the fields of the run's settings (`surgical_peft.cli.arguments.RunArguments`), the same as
`surgical-peft train`'s. Bad input (an unknown block, corruption or column, a severity outside 1-5, a --train-n larger
than the data, labels that are not the model's) stops before training with exit status 2. An interrupted run
(Ctrl-C: exit status 130 and the command that resumes it) resumes from its last checkpoint when rerun with the same
--output-dir. See `python examples/train.py --help` for every option.
"""

import argparse
import sys

from surgical_peft.argparser import HelpFormatter
from surgical_peft.cli.recipe import add_training_arguments, print_summary, printed_run_lines, run_training
from surgical_peft.errors import Interrupted, SurgicalPeftError


def main() -> None:
    if len(sys.argv) == 1:
        from surgical_peft.experiments.demo import demo  # imported here, so that --help answers at once

        demo()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    args = add_training_arguments(parser).parse_args()
    try:
        with printed_run_lines():
            print_summary(run_training(args))
    except Interrupted as error:  # Ctrl-C: where the run stands, and how to resume it
        print(f"{parser.prog}: {error.resume_line(['python', *sys.argv])}", file=sys.stderr)
        sys.exit(130)
    except SurgicalPeftError as error:  # bad input, or training stopped (a non-finite loss)
        parser.error(str(error))  # exit status 2


if __name__ == "__main__":
    main()
