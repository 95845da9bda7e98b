package experiment

import (
	"peft/adapter"
	"peft/full"
	"peft/ia3"
	"peft/lora"
	"peft/lora/adalora"
	"peft/peft"
	"peft/prefixtuning"
	"peft/prompttuning"
)

// Candidate is a fine-tuning method as the comparison runs it: a name, a constructor and the
// learning rate it trains at.
type Candidate struct {
	Name string
	// New builds the method for a run of steps training steps (AdaLoRA's rank schedule needs the
	// total; the other methods ignore it).
	New          func(steps int) (peft.Method, error)
	LearningRate float64
}

// newAdaLoRA is AdaLoRA from rank 12 down to LoRA's rank 8 on the same targets, with the rank
// budget held for the first tenth of the run and frozen for the last fifth.
func newAdaLoRA(steps int, targets peft.Targets, modules []string) (peft.Method, error) {
	cfg := adalora.DefaultConfig()
	cfg.TotalSteps, cfg.TInit, cfg.TFinal = steps, steps/10, steps/5
	cfg.TargetModules, cfg.ModulesToSave = targets, modules
	return adalora.New(cfg)
}

// newPrefixTuning is prefix tuning with 10 virtual tokens through PEFT's reparameterization MLP
// (a plain prefix drawn from N(0, 1), PEFT's init, starts far from the pretrained model: on
// stories260K held-out loss 6.8 against the base model's 4.0).
func newPrefixTuning(modules []string) (peft.Method, error) {
	cfg := prefixtuning.DefaultConfig()
	cfg.NumVirtualTokens, cfg.PrefixProjection, cfg.ModulesToSave = 10, true, modules
	return prefixtuning.New(cfg)
}

// Candidates are the methods the example and the benchmarks compare, each with the new
// classifier head ("score") trained beside it, as Hugging Face PEFT's modules_to_save does for
// sequence classification.
func Candidates() []Candidate {
	head := []string{"score"}
	return []Candidate{
		{Name: "full", LearningRate: 1e-3, New: func(int) (peft.Method, error) {
			return full.New(full.DefaultConfig())
		}},
		{Name: "lora", LearningRate: 1e-2, New: func(int) (peft.Method, error) {
			cfg := lora.DefaultConfig()
			cfg.ModulesToSave = head
			return lora.New(cfg)
		}},
		{Name: "lora-all-linear", LearningRate: 1e-2, New: func(int) (peft.Method, error) {
			cfg := lora.DefaultConfig()
			cfg.TargetModules = peft.TargetPattern(peft.AllLinear)
			cfg.ModulesToSave = head
			return lora.New(cfg)
		}},
		{Name: "dora", LearningRate: 1e-2, New: func(int) (peft.Method, error) {
			cfg := lora.DefaultConfig()
			cfg.UseDoRA, cfg.ModulesToSave = true, head
			return lora.New(cfg)
		}},
		{Name: "adalora", LearningRate: 3e-2, New: func(steps int) (peft.Method, error) {
			return newAdaLoRA(steps, peft.TargetNames("q_proj", "v_proj"), head)
		}},
		{Name: "ia3", LearningRate: 1e-1, New: func(int) (peft.Method, error) {
			cfg := ia3.DefaultConfig()
			cfg.ModulesToSave = head
			return ia3.New(cfg)
		}},
		{Name: "adapter-pfeiffer", LearningRate: 1e-2, New: func(int) (peft.Method, error) {
			cfg := adapter.Pfeiffer()
			cfg.ModulesToSave = head
			return adapter.New(cfg)
		}},
		{Name: "adapter-houlsby", LearningRate: 1e-2, New: func(int) (peft.Method, error) {
			cfg := adapter.Houlsby()
			cfg.ModulesToSave = head
			return adapter.New(cfg)
		}},
		{Name: "prompt-tuning", LearningRate: 3e-2, New: func(int) (peft.Method, error) {
			cfg := prompttuning.DefaultConfig()
			cfg.NumVirtualTokens = 8
			cfg.Init = prompttuning.InitVocab
			cfg.ModulesToSave = head
			return prompttuning.New(cfg)
		}},
		{Name: "prefix-tuning", LearningRate: 1e-2, New: func(int) (peft.Method, error) {
			return newPrefixTuning(head)
		}},
	}
}
