// Package gemmgrad replaces GoMLX v0.25's gradient rules for matrix
// multiplications with GEMM-form rules.
//
// # Why
//
// GoMLX v0.25 differentiates DotGeneral (and Dot) nodes (dotGeneralVJP and
// dotVJP in pkg/core/graph) with a broadcast multiply followed by a
// ReduceSum, which materialises a [rows, out, in] temporary for every weight
// gradient. On the pure-Go backend a d=256 transformer-block training step
// took 11.9 s and 2.5 GB that way; with GEMM-form gradients it took 0.61 s and
// 82 MB, with identical values. The GEMM-form rules here compute the gradient
// of each operand with one DotGeneral of the incoming cotangent and the other
// operand (plus a Transpose where the result's axis order differs from the
// operand's), for any DotGeneral layout: batch axes, several contracting
// axes, free axes anywhere, transposed operands.
//
// # Process-wide
//
// The rules are installed into [graph.VJPRegistration], GoMLX's global table
// of gradient rules, so they affect every gradient built in the process after
// [Enable] is called, by any package. The package does not enable itself on
// import: the core package's peft.NewTrainer calls [EnableFromEnv], before it
// builds any training graph. Build no gradient graph in another goroutine while
// a trainer is being created: GoMLX reads the table without a lock.
//
// # Turning it off
//
// Set the environment variable PEFT_GEMM_GRADIENTS=0 (or "false"/"off")
// before the first trainer is created, or call [Disable] to restore the rules that
// were installed before [Enable] (normally GoMLX's stock rules).
//
// # Concurrency
//
// Enable, Disable and Enabled are serialised by a mutex, so they may be called
// from several goroutines. [graph.VJPRegistration] itself is a plain map that
// GoMLX reads without a lock while it builds gradients: the caller must not
// call Enable or Disable while another goroutine is building a gradient graph
// (graph.Gradient, or a trainer compiling its train step). Gradient graphs
// that are already built keep the rule they were built with.
//
// # How the axes are read
//
// GoMLX v0.25 does not export a DotGeneral node's contracting and batch axes:
// they live in the unexported generated struct nodeInputsDotGeneral
// (pkg/core/graph/gen_backend_ops.go), held in the unexported field
// Node.inputs. This package reads them with reflection (read-only; no unsafe
// writes). Every step is checked: the field and struct names, the field
// types, that the recorded lhs/rhs are the node's inputs, that the axes are
// valid and disjoint, and that the node's output shape is exactly what
// DotGeneral with those axes produces. If any check fails (for example after
// a GoMLX upgrade changes the struct), the rule logs a warning once
// ("gemmgrad: ...") and falls back to the previous (stock) rule for that node,
// so gradients stay correct, only slower. The package tests fail in that case,
// because they assert that the GEMM-form path was taken.
//
// Dot nodes need no reflection: their layout follows from the operand ranks
// ([n]·[n], [m,k]·[k], [m,k]·[k,n]).
package gemmgrad

import (
	"log"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
)

// envVar is the name of the environment variable read by [EnableFromEnv]:
// "0", "false" or "off" (case-insensitive) keep the GEMM-form rules off.
const envVar = "PEFT_GEMM_GRADIENTS"

var (
	mu      sync.Mutex
	enabled bool

	// Rules that were in graph.VJPRegistration when Enable installed ours;
	// restored by Disable and used as fallback.
	prevDotGeneral, prevDot graph.VJP

	// Stock rules as registered by GoMLX, captured at package initialisation
	// (after package graph is initialised). Fallback of last resort.
	stockDotGeneral = graph.VJPRegistration[graph.NodeTypeDotGeneral]
	stockDot        = graph.VJPRegistration[graph.NodeTypeDot]

	// Counters for tests and diagnostics.
	gemmCount     atomic.Int64 // nodes differentiated with the GEMM form.
	fallbackCount atomic.Int64 // nodes handed to the previous rule.

	warnOnce sync.Once
)

// Enable installs the GEMM-form gradient rules for graph.NodeTypeDotGeneral and
// graph.NodeTypeDot into graph.VJPRegistration, process-wide. It is idempotent.
// It must not run while another goroutine builds a gradient graph (see the
// package documentation).
func Enable() {
	mu.Lock()
	defer mu.Unlock()
	if enabled {
		return
	}
	prevDotGeneral = graph.VJPRegistration[graph.NodeTypeDotGeneral]
	prevDot = graph.VJPRegistration[graph.NodeTypeDot]
	graph.VJPRegistration[graph.NodeTypeDotGeneral] = dotGeneralGEMMVJP
	graph.VJPRegistration[graph.NodeTypeDot] = dotGEMMVJP
	enabled = true
}

// Disable restores the gradient rules that were installed before [Enable]
// (normally GoMLX's stock rules). It is idempotent. It must not run while
// another goroutine builds a gradient graph (see the package documentation).
func Disable() {
	mu.Lock()
	defer mu.Unlock()
	if !enabled {
		return
	}
	graph.VJPRegistration[graph.NodeTypeDotGeneral] = prevDotGeneral
	graph.VJPRegistration[graph.NodeTypeDot] = prevDot
	enabled = false
}

// Enabled reports whether the GEMM-form rules are installed.
func Enabled() bool {
	mu.Lock()
	defer mu.Unlock()
	return enabled
}

// EnableFromEnv calls [Enable] unless the environment variable
// PEFT_GEMM_GRADIENTS is "0", "false" or "off" (case-insensitive, surrounding
// spaces ignored); in that case it leaves the current rules alone. It returns
// whether the GEMM-form rules are installed afterwards.
func EnableFromEnv() bool {
	if envDisabled(os.Getenv(envVar)) {
		return Enabled()
	}
	Enable()
	return true
}

// envDisabled reports whether the value of envVar asks for the stock rules.
func envDisabled(value string) bool {
	switch strings.ToLower(strings.TrimSpace(value)) {
	case "0", "false", "off":
		return true
	}
	return false
}

// dotLayout describes a DotGeneral: axes of lhs and rhs, with
// lhsContracting[i] paired with rhsContracting[i] and lhsBatch[i] with rhsBatch[i].
type dotLayout struct {
	lhsContracting, lhsBatch []int
	rhsContracting, rhsBatch []int
}

// dotGeneralGEMMVJP is the GEMM-form graph.VJP for NodeTypeDotGeneral.
func dotGeneralGEMMVJP(node *graph.Node, vjpOutputs []*graph.Node, outputShape shapes.Shape) []*graph.Node {
	layout, reason := dotGeneralLayout(node)
	if reason == "" {
		reason = checkGEMMApplicable(node, vjpOutputs, layout)
	}
	if reason != "" {
		return fallback(reason, prevDotGeneral, stockDotGeneral, node, vjpOutputs, outputShape)
	}
	gemmCount.Add(1)
	inputs := node.Inputs()
	return gemmGradients(inputs[0], inputs[1], vjpOutputs[0], layout)
}

// dotGEMMVJP is the GEMM-form graph.VJP for NodeTypeDot, whose layout follows
// from the operand ranks.
func dotGEMMVJP(node *graph.Node, vjpOutputs []*graph.Node, outputShape shapes.Shape) []*graph.Node {
	inputs := node.Inputs()
	var layout dotLayout
	reason := ""
	switch {
	case len(inputs) != 2:
		reason = "Dot node does not have 2 inputs"
	case inputs[0].Rank() == 1 && inputs[1].Rank() == 1:
		layout = dotLayout{lhsContracting: []int{0}, rhsContracting: []int{0}}
	case inputs[0].Rank() == 2 && (inputs[1].Rank() == 1 || inputs[1].Rank() == 2):
		layout = dotLayout{lhsContracting: []int{1}, rhsContracting: []int{0}}
	default:
		reason = "Dot node with unsupported ranks"
	}
	if reason == "" {
		reason = validateLayout(node, layout)
	}
	if reason == "" {
		reason = checkGEMMApplicable(node, vjpOutputs, layout)
	}
	if reason != "" {
		return fallback(reason, prevDot, stockDot, node, vjpOutputs, outputShape)
	}
	gemmCount.Add(1)
	return gemmGradients(inputs[0], inputs[1], vjpOutputs[0], layout)
}

// fallback hands the node to the previously installed rule (or the stock one).
// Unexpected internal formats are logged once; ordinary unsupported cases
// (e.g. zero-sized dimensions) are not.
func fallback(reason string, prev, stock graph.VJP, node *graph.Node, vjpOutputs []*graph.Node, outputShape shapes.Shape) []*graph.Node {
	fallbackCount.Add(1)
	if strings.HasPrefix(reason, "internal:") {
		warnOnce.Do(func() {
			log.Printf("gemmgrad: WARNING: cannot read the axes of %s (%s): falling back to GoMLX's stock (slow) "+
				"matmul gradient; the GoMLX version is probably not the one this package was written for (v0.25)",
				node.Type(), reason)
		})
	}
	fn := prev
	if fn == nil {
		fn = stock
	}
	if fn == nil {
		panic("gemmgrad: no fallback gradient rule registered for " + node.Type().String())
	}
	return fn(node, vjpOutputs, outputShape)
}

// checkGEMMApplicable returns a non-empty reason if the GEMM form must not be
// used for this node even though its layout is known.
func checkGEMMApplicable(node *graph.Node, vjpOutputs []*graph.Node, _ dotLayout) string {
	if len(vjpOutputs) != 1 || vjpOutputs[0] == nil {
		return "unexpected number of output cotangents"
	}
	inputs := node.Inputs()
	lhs, rhs, v := inputs[0], inputs[1], vjpOutputs[0]
	if lhs.DType() != rhs.DType() || lhs.DType() != node.DType() || v.DType() != node.DType() {
		return "mixed dtypes"
	}
	if !v.Shape().Equal(node.Shape()) {
		return "cotangent shape differs from output shape"
	}
	// The pure-Go backend refuses DotGeneral with zero-sized axes: leave such
	// degenerate cases to the stock rule.
	for _, s := range []shapes.Shape{lhs.Shape(), rhs.Shape(), v.Shape()} {
		if s.Size() == 0 {
			return "zero-sized operand"
		}
	}
	return ""
}

// dotGeneralLayout reads the contracting and batch axes of a DotGeneral node
// from the unexported graph.Node.inputs field (a *nodeInputsDotGeneral in
// GoMLX v0.25) with read-only reflection. It returns a non-empty reason,
// prefixed with "internal:", if anything is not as expected.
func dotGeneralLayout(node *graph.Node) (layout dotLayout, reason string) {
	defer func() {
		// reflect panics on unexpected kinds: turn that into a fallback.
		if r := recover(); r != nil {
			reason = "internal: reflection panicked"
		}
	}()
	if node == nil || node.Type() != graph.NodeTypeDotGeneral {
		return layout, "internal: not a DotGeneral node"
	}
	inputs := node.Inputs()
	if len(inputs) != 2 {
		return layout, "internal: DotGeneral node does not have 2 inputs"
	}
	nv := reflect.ValueOf(node).Elem()
	if nv.Kind() != reflect.Struct {
		return layout, "internal: graph.Node is not a struct"
	}
	field := nv.FieldByName("inputs")
	if !field.IsValid() || field.Kind() != reflect.Interface || field.IsNil() {
		return layout, "internal: graph.Node has no non-nil interface field \"inputs\""
	}
	ptr := field.Elem()
	if ptr.Kind() != reflect.Pointer || ptr.IsNil() || ptr.Elem().Kind() != reflect.Struct {
		return layout, "internal: Node.inputs is not a pointer to a struct"
	}
	st := ptr.Elem()
	if st.Type().Name() != "nodeInputsDotGeneral" {
		return layout, "internal: Node.inputs is a " + st.Type().String() + ", not nodeInputsDotGeneral"
	}
	// The recorded operands must be the node's inputs.
	for i, name := range []string{"lhs", "rhs"} {
		f := st.FieldByName(name)
		if !f.IsValid() || f.Type() != reflect.TypeOf((*graph.Node)(nil)) ||
			f.Pointer() != reflect.ValueOf(inputs[i]).Pointer() {
			return layout, "internal: nodeInputsDotGeneral." + name + " is missing or is not the node's input"
		}
	}
	readInts := func(name string) ([]int, bool) {
		f := st.FieldByName(name)
		if !f.IsValid() || f.Kind() != reflect.Slice || f.Type().Elem().Kind() != reflect.Int {
			return nil, false
		}
		out := make([]int, f.Len())
		for i := range out {
			out[i] = int(f.Index(i).Int())
		}
		return out, true
	}
	var ok [4]bool
	layout.lhsContracting, ok[0] = readInts("lhsContractingAxes")
	layout.lhsBatch, ok[1] = readInts("lhsBatchAxes")
	layout.rhsContracting, ok[2] = readInts("rhsContractingAxes")
	layout.rhsBatch, ok[3] = readInts("rhsBatchAxes")
	if !ok[0] || !ok[1] || !ok[2] || !ok[3] {
		return layout, "internal: nodeInputsDotGeneral axes fields missing or not []int"
	}
	if r := validateLayout(node, layout); r != "" {
		return layout, "internal: " + r
	}
	return layout, ""
}

// validateLayout checks that the axes are in range, disjoint, pairwise of equal
// dimensions, and that the node's output shape is exactly the DotGeneral
// output for that layout: [batch..., lhs free..., rhs free...].
func validateLayout(node *graph.Node, l dotLayout) string {
	inputs := node.Inputs()
	lhs, rhs := inputs[0].Shape(), inputs[1].Shape()
	if len(l.lhsContracting) != len(l.rhsContracting) || len(l.lhsBatch) != len(l.rhsBatch) {
		return "axes counts of lhs and rhs differ"
	}
	lhsFree, okL := freeAxes(lhs.Rank(), l.lhsContracting, l.lhsBatch)
	rhsFree, okR := freeAxes(rhs.Rank(), l.rhsContracting, l.rhsBatch)
	if !okL || !okR {
		return "axes out of range or repeated"
	}
	for i := range l.lhsContracting {
		if lhs.Dimensions[l.lhsContracting[i]] != rhs.Dimensions[l.rhsContracting[i]] {
			return "contracting dimensions differ"
		}
	}
	want := make([]int, 0, node.Rank())
	for i := range l.lhsBatch {
		if lhs.Dimensions[l.lhsBatch[i]] != rhs.Dimensions[l.rhsBatch[i]] {
			return "batch dimensions differ"
		}
		want = append(want, lhs.Dimensions[l.lhsBatch[i]])
	}
	for _, a := range lhsFree {
		want = append(want, lhs.Dimensions[a])
	}
	for _, a := range rhsFree {
		want = append(want, rhs.Dimensions[a])
	}
	if !slices.Equal(want, node.Shape().Dimensions) {
		return "output shape does not match the axes"
	}
	return ""
}

// freeAxes returns, in increasing order, the axes of a rank-`rank` operand
// that are neither contracting nor batch axes. ok is false if an axis is out
// of range or used twice.
func freeAxes(rank int, contracting, batch []int) (free []int, ok bool) {
	used := make([]bool, rank)
	for _, axes := range [][]int{contracting, batch} {
		for _, a := range axes {
			if a < 0 || a >= rank || used[a] {
				return nil, false
			}
			used[a] = true
		}
	}
	for a, u := range used {
		if !u {
			free = append(free, a)
		}
	}
	return free, true
}

// gemmGradients returns the gradients of sum(out ⊙ v) with respect to lhs and
// rhs, where out = DotGeneral(lhs, rhs) with the given layout and v has out's
// shape [batch (nb), lhs free (nl), rhs free (nr)].
//
//	dlhs = DotGeneral(v, contract v's rhs-free axes, batch v's batch axes,
//	                  rhs, contract rhs free axes,  batch rhs batch axes)
//	     -> [batch, lhs free, rhs contracting axes in increasing rhs order]
//	drhs = DotGeneral(lhs, contract lhs free axes,  batch lhs batch axes,
//	                  v,   contract v's lhs-free axes, batch v's batch axes)
//	     -> [batch, lhs contracting axes in increasing lhs order, rhs free]
//
// followed by a transpose into the operand's own axis order (skipped when it
// is the identity).
func gemmGradients(lhs, rhs, v *graph.Node, l dotLayout) []*graph.Node {
	lhsFree, _ := freeAxes(lhs.Rank(), l.lhsContracting, l.lhsBatch)
	rhsFree, _ := freeAxes(rhs.Rank(), l.rhsContracting, l.rhsBatch)
	nb, nl, nr, nc := len(l.lhsBatch), len(lhsFree), len(rhsFree), len(l.lhsContracting)
	vBatch := iota(0, nb)
	vLhsFree := iota(nb, nl)
	vRhsFree := iota(nb+nl, nr)

	// Gradient with respect to lhs.
	dlhs := graph.DotGeneral(v, vRhsFree, vBatch, rhs, rhsFree, l.rhsBatch)
	{
		perm := make([]int, lhs.Rank())
		for i, a := range l.lhsBatch {
			perm[a] = i
		}
		for j, a := range lhsFree {
			perm[a] = nb + j
		}
		// rhs contracting axes come out in increasing rhs-axis order.
		for i, a := range l.lhsContracting {
			perm[a] = nb + nl + rankAmong(l.rhsContracting[i], l.rhsContracting)
		}
		dlhs = transposeIfNeeded(dlhs, perm)
	}

	// Gradient with respect to rhs.
	drhs := graph.DotGeneral(lhs, lhsFree, l.lhsBatch, v, vLhsFree, vBatch)
	{
		perm := make([]int, rhs.Rank())
		for i, a := range l.rhsBatch {
			perm[a] = i
		}
		// lhs contracting axes come out in increasing lhs-axis order.
		for i, a := range l.rhsContracting {
			perm[a] = nb + rankAmong(l.lhsContracting[i], l.lhsContracting)
		}
		for j, a := range rhsFree {
			perm[a] = nb + nc + j
		}
		drhs = transposeIfNeeded(drhs, perm)
	}
	return []*graph.Node{dlhs, drhs}
}

// transposeIfNeeded returns TransposeAllAxes(x, perm...) (output axis i is
// x's axis perm[i]), or x itself when perm is the identity.
func transposeIfNeeded(x *graph.Node, perm []int) *graph.Node {
	for i, p := range perm {
		if i != p {
			return graph.TransposeAllAxes(x, perm...)
		}
	}
	return x
}

// rankAmong returns how many elements of axes are smaller than a.
func rankAmong(a int, axes []int) int {
	n := 0
	for _, b := range axes {
		if b < a {
			n++
		}
	}
	return n
}

// iota returns [start, start+1, ..., start+n-1] (an empty, non-nil slice if n == 0).
func iota(start, n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = start + i
	}
	return out
}
