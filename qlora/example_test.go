package qlora_test

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/stories260k"
	"peft/qlora"
)

// QLoRA on the embedded pretrained stories260K: quantize, train, save the 4-bit model and the
// adapter, merge.
func Example() {
	b, err := backend.Get()
	if err != nil {
		panic(err)
	}
	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, stories260k.FS())
	if err != nil {
		panic(err)
	}

	// NF4, blocks of 64, double quantization; LoRA r=8 on every linear layer but the head.
	// (From a LoRA configuration: qlora.New(qlora.FromLoRA(loraConfig)).)
	method, err := qlora.New(qlora.DefaultConfig())
	if err != nil {
		panic(err)
	}
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 1, 8))
	if err != nil {
		panic(err)
	}
	fmt.Println(m.Report()) // "all params" leaves out the 4-bit weights
	fmt.Printf("4-bit weights: %s in %d layers, %.3f bits each\n", peft.Thousands(method.QuantizedParams()),
		len(method.QuantizedLayers()), 8*float64(method.QuantizedBytes())/float64(method.QuantizedParams()))

	// A few steps on one story.
	story := []int32{1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337}
	ids := tensors.FromFlatDataAndDimensions(story, 1, len(story))
	asInts := make([]int, len(story))
	for i, id := range story {
		asInts[i] = int(id)
	}
	before, _ := generate.MeanNLL(m, asInts)
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 10, LearningRate: 1e-2, Loss: peft.NextTokenLoss, Progress: peft.ProgressOff})
	if err != nil {
		panic(err)
	}
	if _, err := trainer.Train(peft.NewDataset("story", []peft.Batch{{Inputs: []*tensors.Tensor{ids}, Labels: []*tensors.Tensor{ids}}}, true)); err != nil {
		panic(err)
	}
	after, _ := generate.MeanNLL(m, asInts)
	fmt.Println("loss went down:", after < before)

	// The adapter saves like LoRA's; the 4-bit base as a Hugging Face bitsandbytes folder.
	dir, _ := os.MkdirTemp("", "qlora-example")
	defer os.RemoveAll(dir)
	if err := m.Save(filepath.Join(dir, "adapter")); err != nil {
		panic(err)
	}
	if err := qlora.SaveQuantized(filepath.Join(dir, "nf4"), cfg, m, stories260k.FS(), "tokenizer.json"); err != nil {
		panic(err)
	}

	// Merging into float32 copies is exact; re-quantizing the merged weights rounds the update.
	report, err := qlora.Merge(m, qlora.MergeDequantized, ids)
	if err != nil {
		panic(err)
	}
	fmt.Println("dequantized merge changes the logits by < 1e-4:", report.MaxAbsChange < 1e-4)
	if err := m.Unmerge(); err != nil {
		panic(err)
	}
	report, err = qlora.Merge(m, qlora.MergeRequantized, ids)
	if err != nil {
		panic(err)
	}
	fmt.Println("re-quantized merge changes the logits:", report.MaxAbsChange > 1e-3)
	// Output:
	// trainable params: 46,240 || all params: 306,272 || trainable%: 15.0977
	// 4-bit weights: 226,560 in 35 layers, 4.135 bits each
	// loss went down: true
	// dequantized merge changes the logits by < 1e-4: true
	// re-quantized merge changes the logits: true
}
