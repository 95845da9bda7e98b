// Package methods rebuilds a fine-tuning method from a saved state: it reads the method's name
// and configuration that peft.Model.Save wrote and constructs the matching method, so a program
// can load any saved adapter without knowing in advance which method made it.
package methods

import (
	"fmt"
	"sort"

	"peft/adapter"
	"peft/full"
	"peft/lora"
	"peft/lora/adalora"
	"peft/peft"
	"peft/prompttuning"
	"peft/qlora"
)

// constructors builds each method from the configuration saved in a folder.
var constructors = map[string]func(dir string) (peft.Method, error){
	"lora":          fromConfig(lora.New),
	"adapter":       fromConfig(adapter.New),
	"prompt_tuning": fromConfig(prompttuning.New),
	"full":          fromConfig(full.New),
	"qlora":         fromConfig(qlora.New),
	"adalora":       fromConfig(adalora.New),
}

// fromConfig returns a constructor that decodes the saved configuration into C and calls newFn.
func fromConfig[C any, M peft.Method](newFn func(C) (M, error)) func(dir string) (peft.Method, error) {
	return func(dir string) (peft.Method, error) {
		var cfg C
		if _, err := peft.ReadConfig(dir, &cfg); err != nil {
			return nil, err
		}
		return newFn(cfg)
	}
}

// Names lists the methods FromSaved knows, sorted.
func Names() []string {
	names := make([]string, 0, len(constructors))
	for name := range constructors {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// FromSaved returns a new method built from the configuration saved in dir. Apply it to the same
// base model with peft.NewModel, then call Model.Load(dir).
func FromSaved(dir string) (peft.Method, error) {
	var probe map[string]any
	name, err := peft.ReadConfig(dir, &probe)
	if err != nil {
		return nil, err
	}
	construct, found := constructors[name]
	if !found {
		return nil, fmt.Errorf("methods: %s holds a %q state; known methods: %v", dir, name, Names())
	}
	return construct(dir)
}
