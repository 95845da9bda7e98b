// Command merge folds a saved LoRA or AdaLoRA adapter (a Hugging Face PEFT folder, written by this
// SDK or by PEFT) into its base model and writes the result as a standard
// Hugging Face folder (config.json, model.safetensors with Hugging Face names and [out, in]
// layout, tokenizer files copied), which this SDK and Hugging Face transformers load like any
// checkpoint, with no adapter left to apply at inference.
//
//	go run ./examples/merge -adapter my-lora -out merged            # base: the embedded stories260K
//	go run ./examples/merge -model DIR -adapter my-lora -out merged
package main

import (
	"flag"
	"fmt"
	"io/fs"
	"os"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/methods"
	"peft/peft/stories260k"
)

func main() {
	modelDir := flag.String("model", "", "base model: a Hugging Face Llama folder (default: the embedded stories260K)")
	adapterDir := flag.String("adapter", "", "saved adapter to merge: a Hugging Face PEFT LoRA/AdaLoRA folder (from this SDK or from PEFT) or this SDK's layout")
	out := flag.String("out", "", "folder to write the merged model to")
	allowOtherBase := flag.Bool("allow-other-base", false, "apply the adapter even if it was saved on a base model with other weights")
	flag.Parse()
	if *allowOtherBase {
		loadOptions = append(loadOptions, peft.AllowOtherBase())
	}
	if *adapterDir == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "merge: -adapter and -out are required")
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*modelDir, *adapterDir, *out); err != nil {
		fmt.Fprintln(os.Stderr, "merge:", err)
		os.Exit(1)
	}
}

// tokenizerFiles are copied from the base model's folder when present.
var tokenizerFiles = []string{"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"}

// loadOptions are passed to Model.Load (-allow-other-base).
var loadOptions []peft.LoadOption

func run(modelDir, adapterDir, out string) error {
	b, err := backend.Get()
	if err != nil {
		return err
	}
	fmt.Println(backend.Description())
	fsys, name := stories260k.FS(), stories260k.Name
	if modelDir != "" {
		fsys, name = os.DirFS(modelDir), modelDir
	}
	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, fsys)
	if err != nil {
		return err
	}
	peft.NameBaseModel(ctx, name)
	method, err := methods.FromSaved(adapterDir)
	if err != nil {
		return err
	}
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 1, 1))
	if err != nil {
		return err
	}
	if err := m.Load(adapterDir, loadOptions...); err != nil {
		return err
	}
	if err := m.Merge(); err != nil {
		return err
	}
	var present []string
	for _, name := range tokenizerFiles {
		if _, err := fs.Stat(fsys, name); err == nil {
			present = append(present, name)
		}
	}
	if err := llama.SaveHF(out, cfg, ctx, fsys, present...); err != nil {
		return err
	}
	fmt.Printf("merged %s (%s) into the base model and wrote %s (config.json, model.safetensors, %v)\n",
		adapterDir, method.Name(), out, present)
	return nil
}
