// Package methods rebuilds a fine-tuning method from a saved folder, so a program can load any
// adapter without knowing in advance which method made it: a Hugging Face PEFT adapter folder
// (written by this SDK or by PEFT itself, e.g. downloaded from the Hub) or a folder in this SDK's
// own layout. Apply does it all in one call: build the method, apply it to a base model, load.
package methods

import (
	"encoding/json"
	"fmt"
	"sort"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/adapter"
	"peft/full"
	"peft/ia3"
	"peft/lora"
	"peft/lora/adalora"
	"peft/peft"
	"peft/prefixtuning"
	"peft/prompttuning"
	"peft/qlora"
)

// constructors builds each method from the configuration this SDK saved (JSON).
var constructors = map[string]func(config json.RawMessage) (peft.Method, error){
	"lora":          fromConfig(lora.New),
	"adapter":       fromConfig(adapter.New),
	"prompt_tuning": fromConfig(prompttuning.New),
	"full":          fromConfig(full.New),
	"qlora":         fromConfig(qlora.New),
	"adalora":       fromConfig(adalora.New),
	"ia3":           fromConfig(ia3.New),
	// A saved prefix holds the computed prefix, not the projection MLP that made it.
	"prefix_tuning": fromConfig(prefixtuning.NewForInference),
}

// peftConstructors builds each method Hugging Face PEFT has from an adapter_config.json, by
// peft_type.
var peftConstructors = map[string]func(fields *peft.PEFTFields) (peft.Method, error){
	"LORA":          fromPEFT(lora.ParsePEFTConfig, lora.New),
	"ADALORA":       fromPEFT(adalora.ParsePEFTConfig, adalora.New),
	"PROMPT_TUNING": fromPEFT(prompttuning.ParsePEFTConfig, prompttuning.New),
	"PREFIX_TUNING": fromPEFT(prefixtuning.ParsePEFTConfig, prefixtuning.New),
	"IA3":           fromPEFT(ia3.ParsePEFTConfig, ia3.New),
}

// fromConfig returns a constructor that decodes the saved configuration into C and calls newFn.
func fromConfig[C any, M peft.Method](newFn func(C) (M, error)) func(config json.RawMessage) (peft.Method, error) {
	return func(config json.RawMessage) (peft.Method, error) {
		var cfg C
		if err := json.Unmarshal(config, &cfg); err != nil {
			return nil, err
		}
		return newFn(cfg)
	}
}

// fromPEFT returns a constructor that parses a PEFT configuration into C and calls newFn.
func fromPEFT[C any, M peft.Method](parse func(*peft.PEFTFields) (C, error), newFn func(C) (M, error)) func(*peft.PEFTFields) (peft.Method, error) {
	return func(fields *peft.PEFTFields) (peft.Method, error) {
		cfg, err := parse(fields)
		if err != nil {
			return nil, err
		}
		return newFn(cfg)
	}
}

// Names lists the methods of this SDK that FromFolder knows, sorted.
func Names() []string { return sortedKeys(constructors) }

// PEFTTypes lists the Hugging Face PEFT adapter types FromFolder reads, sorted.
func PEFTTypes() []string { return sortedKeys(peftConstructors) }

func sortedKeys[V any](m map[string]V) []string {
	names := make([]string, 0, len(m))
	for name := range m {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// FromFolder returns a new method built from the adapter saved in dir (see peft.FindAdapter;
// peft.AdapterName picks a sub-folder, peft.AsPlainPEFT reads a PEFT folder by its
// adapter_config.json alone). A folder this SDK wrote rebuilds the exact method that saved it
// (QLoRA included, whose folder is a LoRA adapter to PEFT); a folder PEFT wrote is built from
// adapter_config.json's peft_type and fields. Apply the method to the same base model with
// peft.NewModel, then call Model.Load(dir) with the same options — or use Apply.
func FromFolder(dir string, opts ...peft.LoadOption) (peft.Method, error) {
	saved, err := peft.ReadAdapter(dir, opts...)
	if err != nil {
		return nil, err
	}
	if saved.Method != "" {
		construct, found := constructors[saved.Method]
		if !found {
			return nil, fmt.Errorf("methods: %s holds a %q state; known methods: %v", saved.Dir, saved.Method, Names())
		}
		method, err := construct(saved.Config)
		if err != nil {
			return nil, fmt.Errorf("methods: %s config in %s: %w", saved.Method, saved.Dir, err)
		}
		return method, nil
	}
	construct, found := peftConstructors[saved.Fields.PEFTType()]
	if !found {
		return nil, fmt.Errorf("methods: %s: peft_type %q is not supported; supported: %v", saved.Fields.Source(), saved.Fields.PEFTType(), PEFTTypes())
	}
	return construct(saved.Fields)
}

// FromSaved is FromFolder without options.
func FromSaved(dir string) (peft.Method, error) { return FromFolder(dir) }

// Apply builds the method saved in dir (FromFolder), applies it to the model fn whose base
// weights are in ctx (peft.NewModel, traced with inputs shaped like example) and loads the saved
// state: one call from a folder to a model ready to run. opts are Model.Load's, used for both
// steps (peft.AdapterName, peft.AllowOtherBase, peft.AsPlainPEFT).
func Apply(backend backends.Backend, ctx *context.Context, fn peft.ModelFn, dir string, example []shapes.Shape, opts ...peft.LoadOption) (*peft.Model, error) {
	method, err := FromFolder(dir, opts...)
	if err != nil {
		return nil, err
	}
	m, err := peft.NewModel(backend, ctx, fn, method, example...)
	if err != nil {
		return nil, err
	}
	if err := m.Load(dir, opts...); err != nil {
		return nil, err
	}
	return m, nil
}
