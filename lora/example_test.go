package lora_test

import (
	"fmt"
	"math"
	"os"
	"path/filepath"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/lora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/reviews"
)

// The whole LoRA workflow on a small Llama classifier: apply, train, save, merge.
func Example() {
	b, err := backend.Get()
	if err != nil {
		panic(err)
	}
	tok := reviews.NewTokenizer()
	cfg := llama.Tiny()
	cfg.VocabSize = tok.VocabSize()
	ctx := context.New()
	if err := llama.Init(ctx, cfg, 2, 1); err != nil { // a base model with a 2-class "score" head
		panic(err)
	}

	// LoRA r=8 on q_proj and v_proj (the defaults), training the new head beside it.
	lcfg := lora.DefaultConfig()
	lcfg.ModulesToSave = []string{"score"}
	method, err := lora.New(lcfg)
	if err != nil {
		panic(err)
	}
	example := shapes.Make(dtypes.Int32, 16, 8)
	m, err := peft.NewModel(b, ctx, llama.Classifier(cfg, 2), method, example, example)
	if err != nil {
		panic(err)
	}
	fmt.Println(m.Report())

	batches, err := reviews.Batches(tok, reviews.Generate(256, 1), 16, 8)
	if err != nil {
		panic(err)
	}
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{
		Steps: 80, LearningRate: 2e-2, Loss: peft.CrossEntropy, Progress: peft.ProgressOff,
	})
	if err != nil {
		panic(err)
	}
	losses, err := trainer.Train(peft.NewDataset("reviews", batches, true))
	if err != nil {
		panic(err)
	}
	mean := func(xs []float64) float64 {
		var sum float64
		for _, x := range xs {
			sum += x
		}
		return sum / float64(len(xs))
	}
	fmt.Println("loss went down:", mean(losses[len(losses)-10:]) < mean(losses[:10]))

	// Save writes only the adapter (and the head): two small files.
	dir, _ := os.MkdirTemp("", "lora-example")
	defer os.RemoveAll(dir)
	if err := m.Save(filepath.Join(dir, "adapter")); err != nil {
		panic(err)
	}

	// Merge folds the update into the base weights: same outputs, no extra cost.
	before, _ := m.Call(batches[0].Inputs...)
	if err := m.Merge(); err != nil {
		panic(err)
	}
	after, _ := m.Call(batches[0].Inputs...)
	maxDiff := 0.0
	x, y := before[0].Value().([][]float32), after[0].Value().([][]float32)
	for i := range x {
		for j := range x[i] {
			maxDiff = math.Max(maxDiff, math.Abs(float64(x[i][j]-y[i][j])))
		}
	}
	fmt.Println("merged outputs agree within 1e-5:", maxDiff < 1e-5)
	// Output:
	// trainable params: 1,856 || all params: 22,496 || trainable%: 8.2504
	// loss went down: true
	// merged outputs agree within 1e-5: true
}
