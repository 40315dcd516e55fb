from vrag_rl.rollout.watch import main

main()
