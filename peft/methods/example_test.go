package methods_test

import (
	"fmt"
	"os"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/lora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/methods"
	"peft/peft/stories260k"
)

// A LoRA saved on the embedded stories260K is a Hugging Face PEFT adapter folder, which Apply
// turns back into a model in one call, without being told the method.
func ExampleApply() {
	b, _ := backend.Get()
	load := func() (*context.Context, llama.Config) {
		ctx := context.New()
		cfg, _ := llama.LoadPretrainedFS(ctx, stories260k.FS())
		peft.NameBaseModel(ctx, stories260k.Name)
		return ctx, cfg
	}
	example := []shapes.Shape{shapes.Make(dtypes.Int32, 1, 8)}

	ctx, cfg := load()
	method, _ := lora.New(lora.DefaultConfig())
	m, _ := peft.NewModel(b, ctx, llama.CausalLM(cfg), method, example...)
	dir, _ := os.MkdirTemp("", "adapter")
	defer os.RemoveAll(dir)
	if err := m.Save(dir); err != nil {
		fmt.Println(err)
		return
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		fmt.Println(e.Name())
	}
	fields, _ := peft.ReadPEFTFields(dir)
	var base string
	_ = fields.Get("base_model_name_or_path", &base)
	fmt.Println(fields.PEFTType(), "on", base)

	ctx, cfg = load()
	loaded, err := methods.Apply(b, ctx, llama.CausalLM(cfg), dir, example)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(loaded.Method().Name(), loaded.Report())
	// Output:
	// adapter_config.json
	// adapter_model.safetensors
	// LORA on stories260K
	// lora trainable params: 8,960 || all params: 268,992 || trainable%: 3.3310
}
