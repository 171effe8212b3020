"""``mnseg demo``: the main job on embedded data, no data of the user's needed."""

HELP = "run the embedded demo: synthetic MNI152 subjects, supervised vs M&N, a report with pictures"
DESCRIPTION = """Build demo data from the real MNI152 template shipped in nilearn (synthetic deformations,
artefacts and lesions), train the supervised 3D UNet and M&N with the same few labelled subjects,
predict the test subjects, score them and write a report (markdown + HTML, table, curves, overlays).

  mnseg demo --out mnseg_demo                 # CPU preset, about 10 minutes on 2 cores (9.8 measured)
  mnseg demo --out mnseg_demo --device cuda   # longer GPU preset

Re-running continues where it stopped (finished runs are reused)."""


def add_arguments(p):
    p.add_argument("--out", default="mnseg_demo", help="output folder (default: mnseg_demo)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--num-labeled", type=int, default=3, help="labelled subjects given to both methods (default 3)")
    p.add_argument("--num-val", type=int, default=1,
                   help="labelled subjects held out for the validation curves (default 1; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo data, the split and training (default 0)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds); its numbers mean nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")


def run(args) -> int:
    from mnseg.workflows.demo import run_demo

    run_demo(args.out, args.device, args.num_labeled, args.seed, args.quick, progress=not args.no_progress,
             num_val=args.num_val)
    return 0
