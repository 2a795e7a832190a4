#!/usr/bin/env python3
"""Per-call inclusive costs from two callgrind runs of different lengths.

    bench/cgcalls.py SHORT LONG UNITS [REGEX]

SHORT and LONG are callgrind output files of the same program doing fewer
and more units of work (e.g. `--ir-child wasm 2000` and `12000` of the
filter bench, see docs/performance.md); the difference divided by UNITS
cancels start-up. For each function whose name matches REGEX it prints the
inclusive instructions a unit, the calls a unit and the cost a call, from
callgrind's call graph (`calls=` lines). Addresses of JIT code are named
from the newest /tmp/perf-PID.map (run the program with GREYHOOK_PERFMAP=1).
"""
import re,sys,glob,os
maps=sorted(glob.glob("/tmp/perf-*.map"),key=os.path.getmtime)[-1:]
syms=[]
for m in maps:
    for l in open(m):
        p=l.split(" ",2)
        if len(p)==3 and not p[2].startswith("wasm["): syms.append((int(p[0],16),int(p[1],16),p[2].strip()))
def jit(nm):
    m=re.match(r"0x([0-9a-f]+)$",nm)
    if not m: return nm
    ad=int(m.group(1),16)
    for s,l,n in syms:
        if s<=ad<s+l: return "JIT "+n
    return nm
def load(f):
    names={};cur=None;cfn=None;calls={};incl={}
    txt=open(f).read().split("\n")
    i=0
    while i<len(txt):
        l=txt[i]
        m=re.match(r"fn=\((\d+)\)(?: (.*))?$",l)
        if m:
            cur=m.group(1)
            if m.group(2): names[cur]=m.group(2)
        m=re.match(r"cfn=\((\d+)\)(?: (.*))?$",l)
        if m:
            cfn=m.group(1)
            if m.group(2): names[cfn]=m.group(2)
        m=re.match(r"calls=(\d+)",l)
        if m:
            n=int(m.group(1)); cost=int(txt[i+1].split()[1])
            if cur!=cfn:
                calls[cfn]=calls.get(cfn,0)+n; incl[cfn]=incl.get(cfn,0)+cost
            i+=1
        i+=1
    out={}
    for k in calls: 
        nm=jit(names.get(k,k)); c,ic=out.get(nm,(0,0)); out[nm]=(c+calls[k],ic+incl[k])
    return out
a=load(sys.argv[1]); b=load(sys.argv[2]); N=float(sys.argv[3]); pat=sys.argv[4] if len(sys.argv)>4 else ""
rows=[]
for k,(c,ic) in b.items():
    c0,ic0=a.get(k,(0,0))
    dc=(c-c0)/N; di=(ic-ic0)/N
    if dc>0 and re.search(pat,k): rows.append((di,dc,k))
rows.sort(reverse=True)
for di,dc,k in rows[:int(os.environ.get("TOP","60"))]:
    print("%8.0f incl/unit %6.2f calls/unit %7.0f per call  %s"%(di,dc,di/dc,k[:130]))
