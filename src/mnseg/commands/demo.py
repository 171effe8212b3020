"""``mnseg demo``: the main job on embedded data, no data of the user's needed."""

HELP = "run the embedded demo: synthetic MNI152 subjects, supervised vs M&N, a report with pictures"
DESCRIPTION = """Build demo data from the real MNI152 template shipped in nilearn (synthetic deformations,
artefacts and lesions), train the supervised 3D UNet and M&N with the same few labelled subjects,
predict the test subjects, score them and write a report (markdown + HTML, table, curves, overlays).

  mnseg demo --out mnseg_demo                 # CPU preset, about 11 minutes on 2 cores (11.0 measured)
  mnseg demo --out mnseg_demo --long          # the CPU grid's recipe at 2 labelled: M&N beats supervised
  mnseg demo --out mnseg_demo --device cuda   # longer GPU preset

Re-running continues where it stopped (finished runs are reused)."""


def add_arguments(p):
    p.add_argument("--out", default="mnseg_demo", help="output folder (default: mnseg_demo)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--num-labeled", type=int, default=None,
                   help="labelled subjects given to both methods (default 3; --long: 2)")
    p.add_argument("--num-val", type=int, default=None,
                   help="labelled subjects held out for the validation curves (default 1; --long: 2; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo data, the split and training (default 0)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds); its numbers mean nothing")
    p.add_argument("--long", action="store_true",
                   help="the CPU label-efficiency grid's recipe at 2 labelled (1,500 updates per 3D model, 10 test "
                        "subjects), in which M&N beats supervised and the lesion is learnt; its own data and runs "
                        "(OUT/runs_long)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")


def run(args) -> int:
    from mnseg.workflows.demo import demo_mode, run_demo

    run_demo(args.out, args.device, args.num_labeled, args.seed, demo_mode(args.quick, args.long),
             progress=not args.no_progress, num_val=args.num_val)
    return 0
