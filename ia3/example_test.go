package ia3_test

import (
	"fmt"
	"math"
	"os"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/ia3"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/experiment"
	"peft/peft/llama"
)

// (IA)³ teaching the pretrained stories260K a new style of story: apply, train, save as a
// Hugging Face PEFT adapter, merge.
func Example() {
	b, err := backend.Get()
	if err != nil {
		panic(err)
	}
	p, err := experiment.LoadStories260K(b)
	if err != nil {
		panic(err)
	}
	ctx, err := p.NewContext() // a fresh copy of the pretrained weights
	if err != nil {
		panic(err)
	}
	train, err := experiment.LMBatches(p.Tokenizer, experiment.ZorblatStories(200, 1), 4, 64)
	if err != nil {
		panic(err)
	}
	heldOut, err := experiment.LMBatches(p.Tokenizer, experiment.ZorblatStories(8, 1001), 4, 64)
	if err != nil {
		panic(err)
	}

	// PEFT's defaults for Llama: one vector on the outputs of each k_proj and v_proj, and one on
	// the input of each down_proj (a feedforward module).
	method, err := ia3.New(ia3.DefaultConfig())
	if err != nil {
		panic(err)
	}
	example := shapes.Make(dtypes.Int32, 4, 64) // token ids and mask
	m, err := peft.NewModel(b, ctx, llama.CausalLM(p.Config), method, example, example)
	if err != nil {
		panic(err)
	}
	fmt.Println(m.Report())
	for _, path := range []string{"model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"} {
		fmt.Printf("%s: feedforward %v\n", path, method.Feedforward(path))
	}

	// Few parameters, each with a large effect: (IA)³ wants a large learning rate.
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{
		Steps: 50, LearningRate: 0.1, WarmupSteps: 5, Loss: peft.NextTokenLoss, Progress: peft.ProgressOff,
	})
	if err != nil {
		panic(err)
	}
	eval := peft.NewDataset("held-out", heldOut, false)
	before, err := trainer.Evaluate(eval)
	if err != nil {
		panic(err)
	}
	if _, err := trainer.Train(peft.NewDataset("zorblat", train, true)); err != nil {
		panic(err)
	}
	after, err := trainer.Evaluate(eval)
	if err != nil {
		panic(err)
	}
	fmt.Println("held-out loss more than halved:", after.Loss < before.Loss/2)

	// Save writes adapter_config.json (peft_type IA3) and the vectors as ia3_l tensors.
	dir, err := os.MkdirTemp("", "ia3-example")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	if err := m.Save(dir); err != nil {
		panic(err)
	}

	// Merge scales the weights by the vectors: the same model, at the base model's cost.
	if err := m.Merge(); err != nil {
		panic(err)
	}
	merged, err := trainer.Evaluate(eval)
	if err != nil {
		panic(err)
	}
	fmt.Println("merged loss agrees within 1e-4:", math.Abs(merged.Loss-after.Loss) < 1e-4)
	// Output:
	// trainable params: 1,180 || all params: 261,212 || trainable%: 0.4517
	// model.layers.0.self_attn.k_proj: feedforward false
	// model.layers.0.mlp.down_proj: feedforward true
	// held-out loss more than halved: true
	// merged loss agrees within 1e-4: true
}
