package experiment

import (
	"peft/adapter"
	"peft/full"
	"peft/lora"
	"peft/peft"
	"peft/prompttuning"
)

// Candidate is a fine-tuning method as the comparison runs it: a name, a constructor and the
// learning rate it trains at.
type Candidate struct {
	Name         string
	New          func() (peft.Method, error)
	LearningRate float64
}

// Candidates are the methods the example and the benchmarks compare, each with the new
// classifier head ("score") trained beside it, as Hugging Face PEFT's modules_to_save does for
// sequence classification.
func Candidates() []Candidate {
	head := []string{"score"}
	return []Candidate{
		{Name: "full", LearningRate: 1e-3, New: func() (peft.Method, error) {
			return full.New(full.DefaultConfig())
		}},
		{Name: "lora", LearningRate: 1e-2, New: func() (peft.Method, error) {
			cfg := lora.DefaultConfig()
			cfg.ModulesToSave = head
			return lora.New(cfg)
		}},
		{Name: "lora-all-linear", LearningRate: 1e-2, New: func() (peft.Method, error) {
			cfg := lora.DefaultConfig()
			cfg.TargetModules = peft.TargetPattern(peft.AllLinear)
			cfg.ModulesToSave = head
			return lora.New(cfg)
		}},
		{Name: "adapter-pfeiffer", LearningRate: 1e-2, New: func() (peft.Method, error) {
			cfg := adapter.Pfeiffer()
			cfg.ModulesToSave = head
			return adapter.New(cfg)
		}},
		{Name: "adapter-houlsby", LearningRate: 1e-2, New: func() (peft.Method, error) {
			cfg := adapter.Houlsby()
			cfg.ModulesToSave = head
			return adapter.New(cfg)
		}},
		{Name: "prompt-tuning", LearningRate: 3e-2, New: func() (peft.Method, error) {
			cfg := prompttuning.DefaultConfig()
			cfg.NumVirtualTokens = 8
			cfg.Init = prompttuning.InitVocab
			cfg.ModulesToSave = head
			return prompttuning.New(cfg)
		}},
	}
}
