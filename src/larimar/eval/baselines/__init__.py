"""Knowledge-editing baselines (FT-L, ROME, GRACE, IKE) behind :mod:`larimar.eval.editors`.

Use them through the registry (``larimar.eval.editors.make_editor(name, model, tokenizer,
**hparams)``); the modules here hold the method-specific code:

* :mod:`.common` -- locating a layer's MLP output projection (GPT-2 ``Conv1D`` and ``nn.Linear``
  families), finding the subject's last token, weight snapshots, greedy generation, tokenising
  prompt/target pairs for training;
* :mod:`.ft_l` -- FT-L (ROME paper's L-infinity-constrained fine-tuning of one MLP projection);
* :mod:`.rome` -- ROME (rank-one model editing with key second-moment statistics);
* :mod:`.grace` -- GRACE (discrete key-value codebook adaptor with epsilon-balls);
* :mod:`.ike` -- IKE (in-context knowledge editing with copy / update / retain demonstrations).

Importing this package imports nothing heavy.
"""
