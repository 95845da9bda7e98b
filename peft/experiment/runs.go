package experiment

import (
	"fmt"
	"io"
	"math"
	"text/tabwriter"
	"time"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/adapter"
	"peft/full"
	"peft/ia3"
	"peft/lora"
	"peft/peft"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/prompttuning"
)

// LMCandidates are the methods compared on language modelling (teaching a pretrained model a
// new style of text): the same methods as Candidates, without a classifier head, at learning
// rates tuned (on 2 cores, briefly) to teach stories260K the ZorblatStories style in about 50
// steps of 4×64 tokens.
func LMCandidates() []Candidate {
	return []Candidate{
		{Name: "full", LearningRate: 3e-3, New: func(int) (peft.Method, error) {
			return full.New(full.DefaultConfig())
		}},
		{Name: "lora", LearningRate: 3e-2, New: func(int) (peft.Method, error) {
			return lora.New(lora.DefaultConfig())
		}},
		{Name: "lora-all-linear", LearningRate: 1e-2, New: func(int) (peft.Method, error) {
			cfg := lora.DefaultConfig()
			cfg.TargetModules = peft.TargetPattern(peft.AllLinear)
			return lora.New(cfg)
		}},
		{Name: "dora", LearningRate: 3e-2, New: func(int) (peft.Method, error) {
			cfg := lora.DefaultConfig()
			cfg.UseDoRA = true
			return lora.New(cfg)
		}},
		{Name: "adalora", LearningRate: 3e-2, New: func(steps int) (peft.Method, error) {
			return newAdaLoRA(steps, peft.TargetPattern(peft.AllLinear), nil)
		}},
		{Name: "ia3", LearningRate: 1e-1, New: func(int) (peft.Method, error) {
			return ia3.New(ia3.DefaultConfig())
		}},
		{Name: "adapter-pfeiffer", LearningRate: 5e-2, New: func(int) (peft.Method, error) {
			return adapter.New(adapter.Pfeiffer())
		}},
		{Name: "adapter-houlsby", LearningRate: 5e-2, New: func(int) (peft.Method, error) {
			return adapter.New(adapter.Houlsby())
		}},
		{Name: "prompt-tuning", LearningRate: 1e-1, New: func(int) (peft.Method, error) {
			cfg := prompttuning.DefaultConfig()
			cfg.NumVirtualTokens = 10
			cfg.Init = prompttuning.InitVocab
			return prompttuning.New(cfg)
		}},
		{Name: "prefix-tuning", LearningRate: 3e-2, New: func(int) (peft.Method, error) {
			return newPrefixTuning(nil)
		}},
	}
}

// RunOptions configures one fine-tuning run of FineTuneLM or FineTuneClassifier.
type RunOptions struct {
	// Steps and LearningRate of training (warmup over the first tenth, then linear decay).
	Steps        int
	LearningRate float64
	// Checkpoints are the steps (in (0, Steps]) after which the held-out set is evaluated, in
	// increasing order; the evaluation after the last step is always made.
	Checkpoints []int
	// Prompt and SampleTokens (FineTuneLM only): a greedy continuation of SampleTokens tokens of
	// Prompt is generated before and after training. No samples when SampleTokens is 0.
	Prompt       string
	SampleTokens int
	// Seed of the new classifier head (and of every weight with RandomInit).
	Seed uint64
	// RandomInit (FineTuneClassifier only) starts from random weights instead of the pretrained
	// ones: the same architecture, drawn from Seed.
	RandomInit bool
	Progress   peft.Progress
	Output     io.Writer
}

// Checkpoint is the held-out evaluation after Step training steps.
type Checkpoint struct {
	Step           int
	Loss, Accuracy float64
}

// RunResult is one fine-tuning run of a method.
type RunResult struct {
	Method string
	// Start is "pretrained" or "random" (the weights training started from).
	Start        string
	LearningRate float64
	Report       peft.ParamReport
	StepsPerSec  float64
	// LossBefore and LossAfter are the held-out loss before and after training; AccuracyBefore
	// and Accuracy the held-out accuracy (NaN for language modelling).
	LossBefore, LossAfter    float64
	AccuracyBefore, Accuracy float64
	// Checkpoints are the held-out evaluations during training, the last one after the last step.
	Checkpoints []Checkpoint
	// Losses is the training loss of each step.
	Losses []float64
	// SampleBefore and SampleAfter are the prompt and its greedy continuation before and after
	// training (language modelling only).
	SampleBefore, SampleAfter string
	Model                     *peft.Model
}

// StepsToAccuracy is the first checkpoint step at which the held-out accuracy reached target, or
// -1 if none did.
func (r *RunResult) StepsToAccuracy(target float64) int {
	for _, c := range r.Checkpoints {
		if c.Accuracy >= target {
			return c.Step
		}
	}
	return -1
}

// FineTuneLM applies method to a fresh copy of the pretrained language model and trains it with
// next-token loss on train, measuring the held-out loss on eval (and the greedy sample of
// opts.Prompt) before and after.
func (p *Pretrained) FineTuneLM(name string, method peft.Method, train, eval []peft.Batch, opts RunOptions) (*RunResult, error) {
	ctx, err := p.NewContext()
	if err != nil {
		return nil, err
	}
	r, err := p.run(name, "pretrained", ctx, llama.CausalLM(p.Config), method, train, eval, peft.NextTokenLoss, false, opts)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return r, nil
}

// FineTuneClassifier builds a 2-class llama.Classifier on a fresh copy of the pretrained weights
// (or on random weights with opts.RandomInit) with a new "score" head, applies method (which
// should train "score" too, as Candidates do) and trains it with cross-entropy on train,
// evaluating on eval before, at opts.Checkpoints and after.
func (p *Pretrained) FineTuneClassifier(name string, method peft.Method, train, eval []peft.Batch, opts RunOptions) (*RunResult, error) {
	var ctx *context.Context
	var err error
	start := "pretrained"
	if opts.RandomInit {
		start = "random"
		ctx, err = p.NewRandomContext(2, opts.Seed)
	} else if ctx, err = p.NewContext(); err == nil {
		err = llama.Init(ctx, p.Config, 2, opts.Seed) // only the new score head
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	r, err := p.run(name, start, ctx, llama.Classifier(p.Config, 2), method, train, eval, peft.CrossEntropy, true, opts)
	if err != nil {
		return nil, fmt.Errorf("%s (%s): %w", name, start, err)
	}
	return r, nil
}

func (p *Pretrained) run(name, start string, ctx *context.Context, fn peft.ModelFn, method peft.Method,
	train, eval []peft.Batch, loss peft.LossFn, accuracy bool, opts RunOptions) (*RunResult, error) {
	checkpoints, err := checkpointSteps(opts)
	if err != nil {
		return nil, err
	}
	if len(train) == 0 || len(eval) == 0 {
		return nil, fmt.Errorf("no training or no held-out batches")
	}
	var example []shapes.Shape
	for _, in := range train[0].Inputs {
		example = append(example, shapes.Make(dtypes.Int32, in.Shape().Dimensions...))
	}
	m, err := peft.NewModel(p.Backend, ctx, fn, method, example...)
	if err != nil {
		return nil, err
	}
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{
		Steps: opts.Steps, LearningRate: opts.LearningRate, WarmupSteps: opts.Steps / 10,
		Loss: loss, Accuracy: accuracy, Progress: opts.Progress, Output: opts.Output,
	})
	if err != nil {
		return nil, err
	}
	r := &RunResult{Method: name, Start: start, LearningRate: opts.LearningRate, Report: m.Report(), Model: m}
	evalDS := peft.NewDataset("held-out", eval, false)
	before, err := trainer.Evaluate(evalDS)
	if err != nil {
		return nil, err
	}
	r.LossBefore, r.AccuracyBefore = before.Loss, before.Accuracy
	if r.SampleBefore, err = p.sample(m, opts); err != nil {
		return nil, err
	}
	trainDS := peft.NewDataset("train", train, true)
	var elapsed time.Duration
	done := 0
	for _, step := range checkpoints {
		t0 := time.Now()
		if r.Losses, err = trainer.TrainSteps(trainDS, step-done); err != nil {
			return nil, err
		}
		elapsed += time.Since(t0)
		done = step
		res, err := trainer.Evaluate(evalDS)
		if err != nil {
			return nil, err
		}
		r.Checkpoints = append(r.Checkpoints, Checkpoint{Step: step, Loss: res.Loss, Accuracy: res.Accuracy})
	}
	last := r.Checkpoints[len(r.Checkpoints)-1]
	r.LossAfter, r.Accuracy = last.Loss, last.Accuracy
	r.StepsPerSec = float64(opts.Steps) / elapsed.Seconds()
	if r.SampleAfter, err = p.sample(m, opts); err != nil {
		return nil, err
	}
	return r, nil
}

// sample is opts.Prompt and its greedy continuation by m, decoded ("" when opts.SampleTokens is
// 0). Generation stops at </s>.
func (p *Pretrained) sample(m *peft.Model, opts RunOptions) (string, error) {
	if opts.SampleTokens <= 0 {
		return "", nil
	}
	prompt := p.Tokenizer.Encode(opts.Prompt)
	ids, err := generate.Generate(m, prompt, generate.Config{MaxNewTokens: opts.SampleTokens, StopIDs: []int{p.Tokenizer.EOS()}})
	if err != nil {
		return "", fmt.Errorf("sampling: %w", err)
	}
	return p.Tokenizer.Decode(append(prompt, ids...), true), nil
}

// checkpointSteps returns the checkpoint steps of opts, validated, ending with opts.Steps.
func checkpointSteps(opts RunOptions) ([]int, error) {
	if opts.Steps <= 0 {
		return nil, fmt.Errorf("steps must be > 0, got %d", opts.Steps)
	}
	var out []int
	last := 0
	for _, s := range opts.Checkpoints {
		if s <= last || s > opts.Steps {
			return nil, fmt.Errorf("checkpoints %v must increase within (0, %d]", opts.Checkpoints, opts.Steps)
		}
		last = s
		if s < opts.Steps {
			out = append(out, s)
		}
	}
	return append(out, opts.Steps), nil
}

// WriteLMTable prints language-modelling runs as an aligned table: method, trainable
// parameters, learning rate, steps per second and held-out next-token loss (and perplexity)
// before and after.
func WriteLMTable(w io.Writer, results []*RunResult) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "method\ttrainable\ttrainable %\tlr\tsteps/s\tloss before\tloss after\tppl before\tppl after\t")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%s\t%.3f\t%g\t%.2f\t%.4f\t%.4f\t%.1f\t%.2f\t\n", r.Method, peft.Thousands(r.Report.Trainable),
			r.Report.Percent(), r.LearningRate, r.StepsPerSec, r.LossBefore, r.LossAfter, math.Exp(r.LossBefore), math.Exp(r.LossAfter))
	}
	return tw.Flush()
}

// WriteClassifyTable prints classification runs as an aligned table: method, starting weights,
// trainable parameters, learning rate, steps per second, held-out loss before and after, held-out accuracy at
// each checkpoint (the columns of the first result's checkpoints) and the first checkpoint step
// at which accuracy reached target ("-" if none did).
func WriteClassifyTable(w io.Writer, results []*RunResult, target float64) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	header := "method\tstart\ttrainable\ttrainable %\tlr\tsteps/s\tloss before\tloss after\tacc before\t"
	var steps []int
	if len(results) > 0 {
		for _, c := range results[0].Checkpoints {
			steps = append(steps, c.Step)
			header += fmt.Sprintf("acc@%d\t", c.Step)
		}
	}
	header += fmt.Sprintf("steps to %g%%\t", 100*target)
	fmt.Fprintln(tw, header)
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%.3f\t%g\t%.2f\t%.4f\t%.4f\t%.3f\t", r.Method, r.Start, peft.Thousands(r.Report.Trainable),
			r.Report.Percent(), r.LearningRate, r.StepsPerSec, r.LossBefore, r.LossAfter, r.AccuracyBefore)
		for i := range steps {
			if i < len(r.Checkpoints) {
				fmt.Fprintf(tw, "%.3f\t", r.Checkpoints[i].Accuracy)
			} else {
				fmt.Fprint(tw, "-\t")
			}
		}
		if s := r.StepsToAccuracy(target); s > 0 {
			fmt.Fprintf(tw, "%d\t\n", s)
		} else {
			fmt.Fprint(tw, "-\t\n")
		}
	}
	return tw.Flush()
}
