package multi_test

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/lora"
	"peft/lora/multi"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
)

// One base model serving two LoRA adapters: a batch whose rows use either or none, switching and
// deleting adapters without compiling anything new.
func Example() {
	check := func(err error) {
		if err != nil {
			panic(err)
		}
	}
	b, err := backend.Get()
	check(err)
	cfg := llama.Tiny()
	example := shapes.Make(dtypes.Int32, 1, 8)
	dir, err := os.MkdirTemp("", "multi-example")
	check(err)
	defer os.RemoveAll(dir)

	// Two LoRA adapters of one base (seed 1), saved as Hugging Face PEFT folders; B is drawn at
	// random here to stand in for training.
	for i, name := range []string{"summarize", "translate"} {
		ctx := context.New()
		check(llama.Init(ctx, cfg, 0, 1))
		l, err := lora.New(lora.DefaultConfig())
		check(err)
		m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), l, example)
		check(err)
		rng := peft.NewRand(uint64(i))
		for _, tv := range m.TrainableVariables() {
			if v := tv.Variable; v.Name() == "B" {
				check(peft.SetFloat32s(v, peft.Normal(rng, v.Shape().Size(), 0.3)))
			}
		}
		check(m.Save(filepath.Join(dir, name)))
	}

	// The base model once, with 4 adapter slots of rank up to 16 on every linear layer.
	ctx := context.New()
	check(llama.Init(ctx, cfg, 0, 1))
	m, err := multi.NewModel(b, ctx, llama.CausalLM(cfg), multi.DefaultConfig(), example)
	check(err)
	for _, name := range []string{"summarize", "translate"} {
		check(m.Load(name, filepath.Join(dir, name)))
	}
	fmt.Println("adapters:", m.Names())

	// Each row names its adapter ("" for the base model): one call, one graph.
	ids := tensors.FromValue([][]int32{{1, 2, 3, 4, 5, 6, 7, 8}, {8, 7, 6, 5, 4, 3, 2, 1}, {5, 5, 5, 5, 9, 9, 9, 9}})
	out, err := m.Call([]string{"summarize", "translate", ""}, ids)
	check(err)
	fmt.Println("logits:", out[0].Shape().Dimensions)

	// Use picks the adapter of calls without rows (peft.Model.Call, peft/generate).
	check(m.Use("translate"))
	_, err = m.PEFT().Call(ids)
	check(err)

	// Delete frees the slot. Other adapters on the same shapes: the same graphs.
	check(m.Delete("summarize"))
	_, err = m.Call([]string{"translate", "", "translate"}, ids)
	check(err)
	fmt.Println("adapters:", m.Names(), "graphs built:", m.GraphsBuilt())
	// Output:
	// adapters: [summarize translate]
	// logits: [3 8 64]
	// adapters: [translate] graphs built: 2
}
