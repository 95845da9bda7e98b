package qlora_test

// Benchmarks of QLoRA against LoRA on the float32 base: memory, speed and quality.
//
//	go test -run '^$' -bench QLoRA -benchtime 5x ./qlora/
//
// BenchmarkQLoRATrainStep times a training step (next-token loss, AdamW) of LoRA (r=8 on every
// linear layer but the head, float32 base), QLoRA (the same LoRA on an NF4 base with double
// quantization) and QLoRA without double quantization, on two models: the pretrained
// stories260K (hidden 64: its matrices are so small that the per-tensor scale and offset of
// double quantization show) and a random "small" Llama (hidden 256, 4 layers, 4.5M parameters)
// whose matrices have the sizes the 4.127-bit figure assumes. It reports:
//
//   - base_bits/param: bytes the linear weights hold ×8 / their parameters (32 for float32; the
//     packed codes and scales for QLoRA);
//   - base_bytes: every base variable (embedding, norms, linear weights) the context holds;
//   - total_bytes: every variable the context holds after training: base, adapter, optimizer
//     moments and trainer bookkeeping;
//   - ms/step.
//
// BenchmarkQLoRAQuality measures once, on stories260K, the golden sequence's mean NLL
// (golden.json: 0.39728868731037015 under float32) with the base quantized, and after the same
// fine-tuning budget for LoRA and QLoRA on text sampled from the float32 model itself (so the
// fine-tuning can win back what quantization lost), with a held-out sample's NLL beside it.

import (
	"math"
	"sync"
	"testing"
	"time"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/stories260k"
	"peft/qlora"
)

// benchMethod is one method the benchmarks compare.
type benchMethod struct {
	name string
	new  func() (peft.Method, error)
}

func loraAllLinear() lora.Config {
	c := lora.DefaultConfig()
	c.TargetModules = peft.TargetPattern(peft.AllLinear)
	return c
}

var benchMethods = []benchMethod{
	{"lora", func() (peft.Method, error) { return lora.New(loraAllLinear()) }},
	{"qlora", func() (peft.Method, error) { return qlora.New(qlora.FromLoRA(loraAllLinear())) }},
	{"qlora-no-dq", func() (peft.Method, error) {
		c := qlora.FromLoRA(loraAllLinear())
		c.DoubleQuant = false
		return qlora.New(c)
	}},
}

// benchModel is a base model the benchmarks load into a fresh context.
type benchModel struct {
	name string
	load func(ctx *context.Context) (llama.Config, error)
}

var benchModels = []benchModel{
	{"stories260K", func(ctx *context.Context) (llama.Config, error) { return llama.LoadPretrainedFS(ctx, stories260k.FS()) }},
	{"small", func(ctx *context.Context) (llama.Config, error) {
		cfg := llama.Config{VocabSize: 512, HiddenSize: 256, IntermediateSize: 688, NumLayers: 4, NumHeads: 4,
			NumKVHeads: 4, MaxPositions: 256, RMSNormEps: 1e-5, RopeTheta: 10000}
		return cfg, llama.Init(ctx, cfg, 0, 1)
	}},
}

// Batch shape of the step benchmarks.
const (
	benchBatch = 8
	benchSeq   = 64
)

// randomBatches returns n batches of random token ids in [3, vocab) for next-token loss.
func randomBatches(n, vocab int, seed uint64) []peft.Batch {
	rng := peft.NewRand(seed)
	out := make([]peft.Batch, n)
	for i := range out {
		ids := make([]int32, benchBatch*benchSeq)
		for k := range ids {
			ids[k] = int32(3 + rng.IntN(vocab-3))
		}
		t := tensors.FromFlatDataAndDimensions(ids, benchBatch, benchSeq)
		out[i] = peft.Batch{Inputs: []*tensors.Tensor{t}, Labels: []*tensors.Tensor{t}}
	}
	return out
}

// memory is what a model's context holds.
type memory struct {
	baseBits   float64 // bits per linear-weight parameter
	baseBytes  int64
	totalBytes int64
}

func measureMemory(m *peft.Model) memory {
	ctx := m.Context()
	var mem memory
	var linearBytes, linearParams int64
	for _, layer := range m.Layout().Linears {
		if layer.Head {
			continue
		}
		linearParams += int64(layer.In) * int64(layer.Out)
		if w := layer.Weights(ctx); w != nil {
			linearBytes += int64(w.Shape().Memory())
		}
	}
	for _, v := range m.Layout().BaseVariables {
		if current := ctx.GetVariableByScopeAndName(v.Scope(), v.Name()); current != nil && current.HasValue() {
			mem.baseBytes += int64(current.Shape().Memory())
		}
	}
	if q, ok := m.Method().(*qlora.QLoRA); ok {
		linearBytes += q.QuantizedBytes()
		mem.baseBytes += q.QuantizedBytes()
	}
	mem.baseBits = 8 * float64(linearBytes) / float64(linearParams)
	for v := range ctx.IterVariables() {
		if v.HasValue() {
			mem.totalBytes += int64(v.Shape().Memory())
		}
	}
	return mem
}

// BenchmarkQLoRATrainStep times training steps and reports memory per model and method.
func BenchmarkQLoRATrainStep(b *testing.B) {
	bk, err := backend.Get()
	require.NoError(b, err)
	b.Log(backend.Description())
	for _, model := range benchModels {
		for _, method := range benchMethods {
			b.Run(model.name+"/"+method.name, func(b *testing.B) {
				ctx := context.New()
				cfg, err := model.load(ctx)
				require.NoError(b, err)
				meth, err := method.new()
				require.NoError(b, err)
				m, err := peft.NewModel(bk, ctx, llama.CausalLM(cfg), meth, shapes.Make(dtypes.Int32, benchBatch, benchSeq))
				require.NoError(b, err)
				trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 1 << 30, LearningRate: 1e-3,
					Decay: peft.ConstantDecay, Loss: peft.NextTokenLoss, Progress: peft.ProgressOff})
				require.NoError(b, err)
				ds := peft.NewDataset("random", randomBatches(4, cfg.VocabSize, 1), true)
				_, err = trainer.TrainSteps(ds, 2) // compile
				require.NoError(b, err)
				b.ResetTimer()
				_, err = trainer.TrainSteps(ds, b.N)
				require.NoError(b, err)
				b.StopTimer()
				mem := measureMemory(m)
				b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(b.N), "ms/step")
				b.ReportMetric(mem.baseBits, "base_bits/param")
				b.ReportMetric(float64(mem.baseBytes), "base_bytes")
				b.ReportMetric(float64(mem.totalBytes), "total_bytes")
				b.ReportMetric(float64(m.Report().Trainable), "trainable_params")
			})
		}
	}
}

// qualityResult is what BenchmarkQLoRAQuality measures, once per process.
type qualityResult struct {
	float32Golden, nf4Golden, fp4Golden float64
	loraGolden, qloraGolden             float64
	loraHeldOut, qloraHeldOut           float64
	baseHeldOut, nf4HeldOut             float64
	loraTime, qloraTime                 time.Duration
}

var (
	qualityOnce sync.Once
	quality     qualityResult
	qualityErr  error
)

// Data and fine-tuning budget of the quality comparison: 6 batches of sampled text, 4 epochs.
const (
	qualityTrain   = 48
	qualityHeldOut = 8
	qualitySteps   = 24
	qualityLR      = 1e-3
)

// sampleSequences samples n sequences of length ids from m (temperature 1), all at once: each
// step runs the model on the whole [n, length] buffer (causal attention keeps the positions not
// yet written from changing the logits read) and draws every row's next id.
func sampleSequences(m *peft.Model, n, length int, seed uint64) ([][]int, error) {
	rng := peft.NewRand(seed)
	ids := make([]int32, n*length)
	for r := range n {
		ids[r*length] = 1 // <s>
	}
	for t := 1; t < length; t++ {
		out, err := m.Call(tensors.FromFlatDataAndDimensions(ids, n, length))
		if err != nil {
			return nil, err
		}
		logits := out[0].Value().([][][]float32)
		for r := range n {
			row := logits[r][t-1]
			maxLogit := row[0]
			for _, v := range row {
				maxLogit = max(maxLogit, v)
			}
			var total float64
			for _, v := range row {
				total += math.Exp(float64(v - maxLogit))
			}
			u, pick := rng.Float64()*total, len(row)-1
			for id, v := range row {
				if u -= math.Exp(float64(v - maxLogit)); u <= 0 {
					pick = id
					break
				}
			}
			ids[r*length+t] = int32(pick)
		}
	}
	seqs := make([][]int, n)
	for r := range seqs {
		seqs[r] = make([]int, length)
		for t := range length {
			seqs[r][t] = int(ids[r*length+t])
		}
	}
	return seqs, nil
}

func measureQuality(b *testing.B) (r qualityResult, err error) {
	bk, err := backend.Get()
	if err != nil {
		return r, err
	}
	golden := goldenIDs(b)
	newModel := func(method peft.Method) (*peft.Model, error) {
		ctx := context.New()
		cfg, err := llama.LoadPretrainedFS(ctx, stories260k.FS())
		if err != nil {
			return nil, err
		}
		return peft.NewModel(bk, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 1, 8))
	}
	base, err := newModel(nil)
	if err != nil {
		return r, err
	}
	// Text from the float32 model: 48 training sequences and 8 held-out ones, 64 tokens each.
	samples, err := sampleSequences(base, qualityTrain+qualityHeldOut, benchSeq, 1)
	if err != nil {
		return r, err
	}
	train, heldOut := samples[:qualityTrain], samples[qualityTrain:]
	var batches []peft.Batch
	for i := 0; i < len(train); i += benchBatch {
		flat := make([]int32, 0, benchBatch*benchSeq)
		for _, seq := range train[i : i+benchBatch] {
			for _, id := range seq {
				flat = append(flat, int32(id))
			}
		}
		t := tensors.FromFlatDataAndDimensions(flat, benchBatch, benchSeq)
		batches = append(batches, peft.Batch{Inputs: []*tensors.Tensor{t}, Labels: []*tensors.Tensor{t}})
	}
	meanNLL := func(m *peft.Model, seqs [][]int) (float64, error) {
		var sum float64
		for _, s := range seqs {
			nll, err := generate.MeanNLL(m, s)
			if err != nil {
				return 0, err
			}
			sum += nll
		}
		return sum / float64(len(seqs)), nil
	}
	if r.float32Golden, err = generate.MeanNLL(base, golden); err != nil {
		return r, err
	}
	if r.baseHeldOut, err = meanNLL(base, heldOut); err != nil {
		return r, err
	}
	fp4Cfg := qlora.FromLoRA(loraAllLinear())
	fp4Cfg.QuantType = "fp4"
	fp4, err := qlora.New(fp4Cfg)
	if err != nil {
		return r, err
	}
	fp4Model, err := newModel(fp4)
	if err != nil {
		return r, err
	}
	if r.fp4Golden, err = generate.MeanNLL(fp4Model, golden); err != nil {
		return r, err
	}
	fineTune := func(method peft.Method, fresh, tuned, held *float64, took *time.Duration) error {
		m, err := newModel(method)
		if err != nil {
			return err
		}
		if fresh != nil {
			if *fresh, err = generate.MeanNLL(m, golden); err != nil {
				return err
			}
		}
		trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: qualitySteps, LearningRate: qualityLR, WarmupSteps: 3,
			Loss: peft.NextTokenLoss, Progress: peft.ProgressOff})
		if err != nil {
			return err
		}
		start := time.Now()
		if _, err := trainer.Train(peft.NewDataset("sampled", batches, true)); err != nil {
			return err
		}
		*took = time.Since(start)
		if *tuned, err = generate.MeanNLL(m, golden); err != nil {
			return err
		}
		*held, err = meanNLL(m, heldOut)
		return err
	}
	loraMethod, err := lora.New(loraAllLinear())
	if err != nil {
		return r, err
	}
	if err := fineTune(loraMethod, nil, &r.loraGolden, &r.loraHeldOut, &r.loraTime); err != nil {
		return r, err
	}
	qloraMethod, err := qlora.New(qlora.FromLoRA(loraAllLinear()))
	if err != nil {
		return r, err
	}
	nf4, err := newModel(mustQLoRA(qlora.New(qlora.FromLoRA(loraAllLinear()))))
	if err != nil {
		return r, err
	}
	if r.nf4HeldOut, err = meanNLL(nf4, heldOut); err != nil {
		return r, err
	}
	err = fineTune(qloraMethod, &r.nf4Golden, &r.qloraGolden, &r.qloraHeldOut, &r.qloraTime)
	return r, err
}

func mustQLoRA(q *qlora.QLoRA, err error) *qlora.QLoRA {
	if err != nil {
		panic(err)
	}
	return q
}

// BenchmarkQLoRAQuality reports the stories260K losses (measured once per process).
func BenchmarkQLoRAQuality(b *testing.B) {
	qualityOnce.Do(func() { quality, qualityErr = measureQuality(b) })
	require.NoError(b, qualityErr)
	r := quality
	b.Logf("golden NLL: float32 %.4f (golden.json %.4f), NF4 %.4f, FP4 %.4f; after %d steps: LoRA %.4f, QLoRA %.4f",
		r.float32Golden, goldenFloat32NLL, r.nf4Golden, r.fp4Golden, qualitySteps, r.loraGolden, r.qloraGolden)
	b.Logf("held-out sampled NLL: float32 %.4f, NF4 %.4f; after %d steps: LoRA %.4f, QLoRA %.4f; fine-tuning took %v (LoRA) and %v (QLoRA)",
		r.baseHeldOut, r.nf4HeldOut, qualitySteps, r.loraHeldOut, r.qloraHeldOut, r.loraTime.Round(time.Millisecond), r.qloraTime.Round(time.Millisecond))
	for range b.N {
	}
	b.ReportMetric(r.float32Golden, "golden_f32")
	b.ReportMetric(r.nf4Golden, "golden_nf4")
	b.ReportMetric(r.fp4Golden, "golden_fp4")
	b.ReportMetric(r.loraGolden, "golden_lora_tuned")
	b.ReportMetric(r.qloraGolden, "golden_qlora_tuned")
	b.ReportMetric(r.baseHeldOut, "heldout_f32")
	b.ReportMetric(r.nf4HeldOut, "heldout_nf4")
	b.ReportMetric(r.loraHeldOut, "heldout_lora_tuned")
	b.ReportMetric(r.qloraHeldOut, "heldout_qlora_tuned")
}
